//! What an RDP client sends before the gateway decides anything: the MS-RDPEPS
//! preconnection blob (PCB) carrying the routing token, then the X.224 Connection Request
//! (MS-RDPBCGR 2.2.1.1) with the `mstshash` cookie and the security protocols the client
//! asks for. Both are decoded with `ironrdp-pdu`.
//!
//! [`parse`] works on a byte prefix and says how many bytes it needs next, so the async
//! reader never reads past the Connection Request (everything after it belongs to the TLS
//! handshake with the host) and the parser itself can be fuzzed without a runtime. Sizes
//! are bounded before anything is buffered.

use ironrdp_pdu::nego::{ConnectionRequest, NegoRequestData, SecurityProtocol};
use ironrdp_pdu::pcb::PreconnectionBlob;
use ironrdp_pdu::x224::X224;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest preconnection blob accepted (a routing token is about 250 characters: 0.5 KiB).
pub const MAX_PCB: usize = 8 * 1024;
/// Largest X.224 Connection Request accepted (real ones are under 100 bytes).
pub const MAX_X224: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// The PCB's string: the routing token (unchecked here).
    pub token: String,
    /// The Connection Request exactly as received, to be passed on to the host.
    pub connection_request: Vec<u8>,
    /// `mstshash` cookie (usually the user name typed into the client).
    pub cookie: Option<String>,
    /// Security protocols requested: "tls", "credssp", ... (empty: standard RDP security).
    pub protocols: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("no routing token: the client sent no preconnection blob (use `postern rdp`, or /pcb: with FreeRDP)")]
    NoBlob,
    #[error("no routing token in the preconnection blob (version 1 blob or empty string)")]
    NoToken,
    #[error("preconnection blob of {0} bytes is larger than the {MAX_PCB}-byte limit")]
    BlobTooLarge(u64),
    #[error("malformed preconnection blob: {0}")]
    BadBlob(String),
    #[error("X.224 connection request of {0} bytes is larger than the {MAX_X224}-byte limit")]
    RequestTooLarge(usize),
    #[error("malformed X.224 connection request: {0}")]
    BadRequest(String),
    #[error("connection closed after {0} bytes, before the connection request was complete")]
    Truncated(usize),
    #[error("reading from the client failed: {0}")]
    Io(String),
}

impl PreambleError {
    /// Short stable name for audit events.
    pub fn code(&self) -> &'static str {
        match self {
            PreambleError::NoBlob | PreambleError::NoToken => "no-token",
            PreambleError::BlobTooLarge(_) | PreambleError::RequestTooLarge(_) => "oversized",
            PreambleError::BadBlob(_) | PreambleError::BadRequest(_) => "malformed",
            PreambleError::Truncated(_) => "truncated",
            PreambleError::Io(_) => "io",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The prefix is consistent so far; this many bytes in total are needed to go on.
    Need(usize),
    /// Complete; the preamble used this many bytes.
    Done(Preamble, usize),
}

/// Parse as much of `buf` as possible. Never asks for more than `MAX_PCB + MAX_X224` bytes.
pub fn parse(buf: &[u8]) -> Result<Step, PreambleError> {
    let Some(head) = first4(buf) else { return Ok(Step::Need(4)) };
    // A TPKT header (version 3, reserved 0) where the PCB's size should be: no blob at all.
    // A real blob cannot start this way: its size would be 3 + k * 2^16 bytes, over the limit.
    if head[..2] == [3, 0] {
        return Err(PreambleError::NoBlob);
    }
    let cb = u32::from_le_bytes(head);
    let cb_len = usize::try_from(cb).unwrap_or(usize::MAX);
    if cb_len > MAX_PCB {
        return Err(PreambleError::BlobTooLarge(u64::from(cb)));
    }
    if cb_len < PreconnectionBlob::FIXED_PART_SIZE {
        return Err(PreambleError::BadBlob(format!("size field {cb} is below the 16-byte minimum")));
    }
    let Some(blob) = buf.get(..cb_len) else { return Ok(Step::Need(cb_len)) };
    let pcb: PreconnectionBlob =
        ironrdp_core::decode(blob).map_err(|e| PreambleError::BadBlob(first_line(&e.to_string())))?;
    let token = pcb.v2_payload.map(|s| s.trim_end_matches('\0').to_owned()).unwrap_or_default();
    if token.is_empty() {
        return Err(PreambleError::NoToken);
    }

    let rest = buf.get(cb_len..).unwrap_or_default();
    let Some([version, _, hi, lo]) = first4(rest) else { return Ok(Step::Need(cb_len + 4)) };
    if version != 3 {
        return Err(PreambleError::BadRequest(format!("expected a TPKT header (version 3), got byte {version:#04x}")));
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_X224 {
        return Err(PreambleError::RequestTooLarge(len));
    }
    // TPKT header (4) + the smallest X.224 CR TPDU header (7).
    if len < 11 {
        return Err(PreambleError::BadRequest(format!("TPKT length {len} is too short")));
    }
    let Some(request) = rest.get(..len) else { return Ok(Step::Need(cb_len + len)) };
    let cr: X224<ConnectionRequest> =
        ironrdp_core::decode(request).map_err(|e| PreambleError::BadRequest(first_line(&e.to_string())))?;
    let cookie = match cr.0.nego_data {
        Some(NegoRequestData::Cookie(c)) => Some(c.0.chars().take(128).collect()),
        _ => None,
    };
    let preamble =
        Preamble { token, connection_request: request.to_vec(), cookie, protocols: protocol_names(cr.0.protocol) };
    Ok(Step::Done(preamble, cb_len + len))
}

fn first4(b: &[u8]) -> Option<[u8; 4]> {
    b.get(..4).and_then(|s| s.try_into().ok())
}

fn protocol_names(p: SecurityProtocol) -> Vec<&'static str> {
    let known = [
        (SecurityProtocol::SSL, "tls"),
        (SecurityProtocol::HYBRID, "credssp"),
        (SecurityProtocol::RDSTLS, "rdstls"),
        (SecurityProtocol::HYBRID_EX, "credssp-early-auth"),
        (SecurityProtocol::RDSAAD, "aad"),
    ];
    let names: Vec<&'static str> = known.iter().filter(|(f, _)| p.contains(*f)).map(|(_, n)| *n).collect();
    if names.is_empty() { vec!["rdp"] } else { names }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().chars().take(200).collect()
}

/// Read exactly the preamble from the client (callers bound the time it may take).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Preamble, PreambleError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        match parse(&buf)? {
            Step::Done(p, _) => return Ok(p),
            Step::Need(n) => {
                let have = buf.len();
                buf.resize(n, 0);
                let mut filled = have;
                while filled < n {
                    match r.read(buf.get_mut(filled..n).unwrap_or_default()).await {
                        Ok(0) => return Err(PreambleError::Truncated(filled)),
                        Ok(k) => filled += k,
                        Err(e) => return Err(PreambleError::Io(e.to_string())),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironrdp_pdu::nego::{Cookie, RequestFlags};
    use ironrdp_pdu::pcb::PcbVersion;

    /// What FreeRDP 2 sends for `/pcb:pst1.abc-DEF_x.yz /sec:tls /u:x` (captured).
    const FREERDP: &str = "38000000000000000200000000000000130070007300740031002e006100620063002d004400450046005f0078002e0079007a00000000000300002722e00000000000436f6f6b69653a206d737473686173683d780d0a0100080001000000";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    pub(crate) fn blob(token: &str) -> Vec<u8> {
        let pcb = PreconnectionBlob { version: PcbVersion::V2, id: 0, v2_payload: Some(token.to_owned()) };
        ironrdp_core::encode_vec(&pcb).unwrap()
    }

    fn request(cookie: &str, protocol: SecurityProtocol) -> Vec<u8> {
        let cr = ConnectionRequest {
            nego_data: Some(NegoRequestData::Cookie(Cookie(cookie.to_owned()))),
            flags: RequestFlags::empty(),
            protocol,
            correlation_info: None,
        };
        ironrdp_core::encode_vec(&X224(cr)).unwrap()
    }

    #[test]
    fn freerdp_capture() {
        let bytes = unhex(FREERDP);
        let Ok(Step::Done(p, used)) = parse(&bytes) else { panic!("{:?}", parse(&bytes)) };
        assert_eq!(used, bytes.len());
        assert_eq!(p.token, "pst1.abc-DEF_x.yz");
        assert_eq!(p.cookie.as_deref(), Some("x"));
        assert_eq!(p.protocols, vec!["tls"]);
        assert_eq!(p.connection_request, bytes[56..]);
    }

    #[test]
    fn needs_exactly_what_it_lacks_and_never_more() {
        let mut bytes = blob("pr1.tok");
        let pcb_len = bytes.len();
        bytes.extend(request("alice", SecurityProtocol::SSL | SecurityProtocol::HYBRID));
        let total = bytes.len();
        bytes.extend_from_slice(b"\x16\x03\x01 TLS client hello follows");
        // Every prefix either asks for more (within what the preamble needs) or completes.
        for cut in 0..=bytes.len() {
            match parse(&bytes[..cut]).unwrap() {
                Step::Need(n) => assert!(n > cut && n <= total, "cut {cut}: need {n}"),
                Step::Done(p, used) => {
                    assert!(cut >= total);
                    assert_eq!(used, total);
                    assert_eq!(p.protocols, vec!["tls", "credssp"]);
                    assert_eq!(p.connection_request.len(), total - pcb_len);
                }
            }
        }
    }

    #[test]
    fn rejects_missing_oversized_and_garbage() {
        let x224 = request("alice", SecurityProtocol::SSL);
        assert_eq!(parse(&x224), Err(PreambleError::NoBlob));
        assert_eq!(parse(&[0xff, 0xff, 0xff, 0x7f]), Err(PreambleError::BlobTooLarge(0x7fff_ffff)));
        assert!(matches!(parse(&[8, 0, 0, 0]), Err(PreambleError::BadBlob(_))));
        let v1 =
            ironrdp_core::encode_vec(&PreconnectionBlob { version: PcbVersion::V1, id: 7, v2_payload: None }).unwrap();
        assert_eq!(parse(&v1), Err(PreambleError::NoToken));
        let mut b = blob("pr1.tok");
        b.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(matches!(parse(&b), Err(PreambleError::BadRequest(_))));
        let mut b = blob("pr1.tok");
        b.extend_from_slice(&[3, 0, 0xff, 0xff]);
        assert_eq!(parse(&b), Err(PreambleError::RequestTooLarge(0xffff)));
        let mut b = blob("pr1.tok");
        b.extend_from_slice(&[3, 0, 0, 11, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(parse(&b), Err(PreambleError::BadRequest(_))));
    }

    #[tokio::test]
    async fn reader_stops_at_the_request_and_reports_truncation() {
        let mut bytes = blob("pr1.tok");
        bytes.extend(request("bob", SecurityProtocol::HYBRID));
        let n = bytes.len();
        bytes.extend_from_slice(b"rest");
        let mut r = &bytes[..];
        let p = read(&mut r).await.unwrap();
        assert_eq!(p.cookie.as_deref(), Some("bob"));
        assert_eq!(r, b"rest");
        let mut short = &bytes[..n - 3];
        assert_eq!(read(&mut short).await, Err(PreambleError::Truncated(n - 3)));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    // Cases: PROPTEST_CASES (tests/run.sh sets the suite's fuzz budget).
    proptest! {
        /// Arbitrary bytes: an error, a request for more (bounded, beyond what is there), or
        /// a complete preamble within the input. Never a panic.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            match parse(&bytes) {
                Ok(Step::Need(n)) => prop_assert!(n > bytes.len() && n <= MAX_PCB + MAX_X224),
                Ok(Step::Done(p, used)) => {
                    prop_assert!(used <= bytes.len());
                    prop_assert!(!p.token.is_empty());
                }
                Err(_) => {}
            }
        }

        /// A valid blob followed by arbitrary bytes as the connection request.
        #[test]
        fn valid_blob_then_garbage(token in "[ -~]{1,300}", tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut bytes = tests::blob(&token);
            let pcb = bytes.len();
            bytes.extend_from_slice(&tail);
            match parse(&bytes) {
                Ok(Step::Need(n)) => prop_assert!(n > bytes.len() && n <= pcb + MAX_X224),
                Ok(Step::Done(p, used)) => {
                    prop_assert_eq!(p.token, token);
                    prop_assert_eq!(used, pcb + p.connection_request.len());
                }
                Err(PreambleError::BadRequest(_) | PreambleError::RequestTooLarge(_)) => {}
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}
