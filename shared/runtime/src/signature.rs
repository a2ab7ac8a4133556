//! `sha256=` HMAC signatures as GitHub sends them in `X-Hub-Signature-256` (and
//! as gantry's own signed webhooks send them in `X-Gantry-Signature-256`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn sign_sha256(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a `sha256=<hex>` header value against the body in constant time.
///
/// Any malformed header (wrong prefix, odd or non-hex digits, wrong length) is
/// simply "not valid": the caller answers 401 either way and learns nothing more.
pub fn verify_sha256(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    // verify_slice compares in constant time (subtle) and rejects wrong lengths.
    mac.verify_slice(&sig).is_ok()
}

/// Constant-time equality of two byte strings (tokens, hashes).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published test vector (docs: "Validating webhook deliveries").
    #[test]
    fn github_published_vector() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign_sha256(secret, body), expected);
        assert!(verify_sha256(secret, body, expected));
    }

    #[test]
    fn rejects_tampering_and_garbage() {
        let secret = b"It's a Secret to Everybody";
        let good = sign_sha256(secret, b"Hello, World!");
        assert!(!verify_sha256(secret, b"Hello, World?", &good));
        assert!(!verify_sha256(b"another secret", b"Hello, World!", &good));
        assert!(!verify_sha256(
            secret,
            b"Hello, World!",
            &good.replace("sha256=", "sha1=")
        ));
        assert!(!verify_sha256(
            secret,
            b"Hello, World!",
            &good[..good.len() - 2]
        ));
        assert!(!verify_sha256(secret, b"Hello, World!", "sha256=zz"));
        assert!(!verify_sha256(secret, b"Hello, World!", ""));
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
