//! Primitive encoders and a bounds-checked reader for message payloads.
//!
//! Integers are big-endian. Byte strings and UTF-8 strings carry a u32 length prefix,
//! lists a u16 count, optional values a 0/1 presence byte.

use crate::ProtoError;

pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        // Frames are bounded far below 4 GiB, so the length always fits.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
    }
    pub(crate) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    pub(crate) fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    pub(crate) fn strs(&mut self, v: &[String]) {
        self.u16(u16::try_from(v.len()).unwrap_or(u16::MAX));
        for s in v.iter().take(usize::from(u16::MAX)) {
            self.str(s);
        }
    }
    pub(crate) fn pairs(&mut self, v: &[(String, String)]) {
        self.u16(u16::try_from(v.len()).unwrap_or(u16::MAX));
        for (k, val) in v.iter().take(usize::from(u16::MAX)) {
            self.str(k);
            self.str(val);
        }
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        let (head, rest) = self.buf.split_at_checked(n).ok_or(ProtoError::Truncated(what))?;
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, ProtoError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn fixed<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtoError> {
        self.array(what)
    }
    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, ProtoError> {
        let len = self.u32(what)? as usize;
        // `take` checks the length against what is actually there before anything is
        // allocated, so a lying length prefix cannot make us reserve memory.
        Ok(self.take(len, what)?.to_vec())
    }
    pub(crate) fn str(&mut self, what: &'static str) -> Result<String, ProtoError> {
        String::from_utf8(self.bytes(what)?).map_err(|_| ProtoError::InvalidUtf8(what))
    }
    pub(crate) fn opt_str(&mut self, what: &'static str) -> Result<Option<String>, ProtoError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.str(what)?)),
            v => Err(ProtoError::InvalidValue { field: what, value: u32::from(v) }),
        }
    }
    /// A boolean: exactly 0 or 1, anything else is malformed.
    pub(crate) fn flag(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtoError::InvalidValue { field: what, value: u32::from(v) }),
        }
    }
    pub(crate) fn strs(&mut self, what: &'static str) -> Result<Vec<String>, ProtoError> {
        let n = self.u16(what)?;
        // Each element needs at least 4 bytes, which bounds the allocation by the input.
        let mut out = Vec::with_capacity(usize::from(n).min(self.buf.len() / 4));
        for _ in 0..n {
            out.push(self.str(what)?);
        }
        Ok(out)
    }
    pub(crate) fn pairs(&mut self, what: &'static str) -> Result<Vec<(String, String)>, ProtoError> {
        let n = self.u16(what)?;
        let mut out = Vec::with_capacity(usize::from(n).min(self.buf.len() / 8));
        for _ in 0..n {
            let k = self.str(what)?;
            let v = self.str(what)?;
            out.push((k, v));
        }
        Ok(out)
    }
    pub(crate) fn finish(self) -> Result<(), ProtoError> {
        if self.buf.is_empty() { Ok(()) } else { Err(ProtoError::TrailingBytes(self.buf.len())) }
    }
}
