//! Places for connections that have not proved who they are yet, capped in all and per
//! source address, so that one address holding many idle connections cannot take every
//! place. The gateway's doors (SSH startups, RDP handshakes) and enrollment use it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The table of places taken: at most `max_total` at once, `max_per_source` from one address.
#[derive(Debug)]
pub struct SourceSlots {
    max_total: usize,
    max_per_source: usize,
    /// Places taken: in all, and by source address (an address appears only while it
    /// holds a place, so the map is bounded by `max_total`).
    taken: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    Total,
    /// Its address holds `max_per_source` places already.
    Source,
}

/// One connection's place, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    table: Arc<SourceSlots>,
    source: IpAddr,
}

impl SourceSlots {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self { max_total, max_per_source, taken: Mutex::new((0, HashMap::new())) })
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    pub fn max_per_source(&self) -> usize {
        self.max_per_source
    }

    /// A place for a new connection from `source`, or which cap it is over.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Full> {
        let Ok(mut taken) = self.taken.lock() else { return Err(Full::Total) };
        let (total, by_source) = &mut *taken;
        if *total >= self.max_total {
            return Err(Full::Total);
        }
        let n = by_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Full::Source);
        }
        *n += 1;
        *total += 1;
        Ok(Slot { table: self.clone(), source })
    }

    /// Places taken (in all, from `source`).
    pub fn taken(&self, source: IpAddr) -> (usize, usize) {
        self.taken.lock().map(|t| (t.0, t.1.get(&source).copied().unwrap_or(0))).unwrap_or((0, 0))
    }

    /// Addresses holding a place.
    pub fn sources(&self) -> usize {
        self.taken.lock().map(|t| t.1.len()).unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Ok(mut taken) = self.table.taken.lock() else { return };
        let (total, by_source) = &mut *taken;
        *total = total.saturating_sub(1);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn caps_per_source_and_in_all_and_places_come_back() {
        let t = SourceSlots::new(5, 3);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| t.admit(a).unwrap()).collect();
        assert_eq!(t.admit(a).unwrap_err(), Full::Source);
        let b1 = t.admit(b).unwrap();
        let b2 = t.admit(b).unwrap();
        assert_eq!(t.admit(b).unwrap_err(), Full::Total);
        assert_eq!(t.taken(a), (5, 3));
        drop(b1);
        drop(b2);
        assert_eq!(t.taken(b), (3, 0));
        drop(held);
        assert_eq!(t.taken(a), (0, 0));
        assert_eq!(t.sources(), 0, "no entry left for idle sources");
    }
}
