//! The little-endian record format of Vedette's local cache files (compiled rules here, scan
//! results in the agent): fixed-width integers, length-prefixed text, and a SHA-256 seal over
//! the whole file so a damaged file is detected and never parsed.

use sha2::{Digest, Sha256};

/// Appends values to a buffer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    /// A length (u32) and the bytes; longer text is cut at 4 GiB, which no field comes near.
    pub fn text(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(u32::MAX as usize)];
        self.u32(b.len() as u32);
        self.bytes(b);
    }
    /// A length (u64) and the bytes.
    pub fn blob(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.bytes(b);
    }
    /// The buffer with its SHA-256 appended.
    pub fn seal(mut self) -> Vec<u8> {
        let sum = Sha256::digest(&self.0);
        self.0.extend_from_slice(&sum);
        self.0
    }
}

/// The body of a sealed buffer, when its SHA-256 matches.
pub fn unseal(data: &[u8]) -> Option<&[u8]> {
    let body_len = data.len().checked_sub(32)?;
    let (body, sum) = data.split_at(body_len);
    (Sha256::digest(body).as_slice() == sum).then_some(body)
}

/// Reads values back; every read is None past the end.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }
    pub fn text(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    pub fn blob(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_a_damaged_seal_is_refused() {
        let mut w = Writer::default();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.text("five");
        w.blob(b"six");
        let mut sealed = w.seal();
        let body = unseal(&sealed).unwrap();
        let mut r = Reader(body);
        assert_eq!(
            (r.u8(), r.u16(), r.u32(), r.u64()),
            (Some(1), Some(2), Some(3), Some(4))
        );
        assert_eq!(r.text().as_deref(), Some("five"));
        assert_eq!(r.blob(), Some(&b"six"[..]));
        assert_eq!(r.u8(), None);
        sealed[3] ^= 1;
        assert!(unseal(&sealed).is_none());
    }
}
