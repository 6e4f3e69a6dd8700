//! The webhook signatures of the platforms: HMAC-SHA256 (Slack, WhatsApp,
//! webhooks) and HMAC-SHA1 (Twilio), compared in constant time by the
//! `hmac` crate's `verify_slice`.

use hmac::{Hmac, Mac};

use super::Rejection;

/// Whether `signature` is the HMAC-SHA256 of the concatenated `parts` with
/// `key`.
pub fn hmac_sha256_matches(key: &[u8], parts: &[&[u8]], signature: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
        return false;
    };
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(signature).is_ok()
}

/// Whether `signature` is the HMAC-SHA1 of the concatenated `parts` with
/// `key`.
pub fn hmac_sha1_matches(key: &[u8], parts: &[&[u8]], signature: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(key) else {
        return false;
    };
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(signature).is_ok()
}

/// Whether `presented` is `prefix` followed by the hex HMAC-SHA256 of the
/// concatenated `parts` with `key`.
pub fn hex_hmac_sha256_matches(
    key: &[u8],
    parts: &[&[u8]],
    presented: &str,
    prefix: &str,
) -> Result<(), Rejection> {
    let digest = presented
        .trim()
        .strip_prefix(prefix)
        .and_then(decode_hex)
        .ok_or(Rejection("the signature is not its prefix and hex digits"))?;
    if hmac_sha256_matches(key, parts, &digest) {
        Ok(())
    } else {
        Err(Rejection("wrong signature"))
    }
}

/// Hexadecimal digits (either case) as bytes.
pub fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |byte: u8| (byte as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 4231, test case 2.
    #[test]
    fn hmac_sha256_matches_the_rfc_vector() {
        let expected =
            decode_hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843").unwrap();
        assert!(hmac_sha256_matches(
            b"Jefe",
            &[b"what do ya want ", b"for nothing?"],
            &expected
        ));
        assert!(!hmac_sha256_matches(
            b"Jefe",
            &[b"what do ya want"],
            &expected
        ));
    }

    // RFC 2202, test case 2.
    #[test]
    fn hmac_sha1_matches_the_rfc_vector() {
        let expected = decode_hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79").unwrap();
        assert!(hmac_sha1_matches(
            b"Jefe",
            &[b"what do ya want for nothing?"],
            &expected
        ));
    }

    #[test]
    fn hex_is_decoded_strictly() {
        assert_eq!(decode_hex("00ff0A"), Some(vec![0, 255, 10]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
