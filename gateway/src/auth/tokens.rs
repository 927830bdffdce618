//! Team token format: `rw_` + 22 base62 characters of secret (128 random bits) + 6 base62
//! characters of CRC-32 checksum over the rest. The prefix lets secret scanners recognise a
//! leaked token; the checksum tells a typo or a truncated copy apart from a revoked token
//! without a database look-up. Only the SHA-256 of a token is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const TOKEN_PREFIX: &str = "rw_";
const SECRET_CHARS: usize = 22;
const CHECKSUM_CHARS: usize = 6;
/// Full length of a token: `rw_` + secret + checksum.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + SECRET_CHARS + CHECKSUM_CHARS;
/// How much of a token is kept in the clear to help people recognise it (`rw_` + 4).
pub const DISPLAY_PREFIX_LEN: usize = TOKEN_PREFIX.len() + 4;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented string cannot be a Rewind token (the database is not consulted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("this is not a Rewind token: team tokens start with `rw_`")]
    NotRewindToken,
    #[error("the token has the wrong length or characters: copy it again in full")]
    Malformed,
    #[error("the token's checksum does not match: it was mistyped or cut short; copy it again")]
    BadChecksum,
}

fn encode_base62(mut value: u128, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(out).expect("base62 is ascii")
}

fn checksum(body: &str) -> String {
    encode_base62(crc32fast::hash(body.as_bytes()) as u128, CHECKSUM_CHARS)
}

/// A fresh random token.
pub fn generate() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let body = format!(
        "{TOKEN_PREFIX}{}",
        encode_base62(u128::from_le_bytes(bytes), SECRET_CHARS)
    );
    let sum = checksum(&body);
    format!("{body}{sum}")
}

/// Checks a token's shape and checksum.
pub fn check_format(token: &str) -> Result<(), TokenFormatError> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Err(TokenFormatError::NotRewindToken);
    }
    if token.len() != TOKEN_LEN
        || !token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
    {
        return Err(TokenFormatError::Malformed);
    }
    let (body, sum) = token.split_at(TOKEN_LEN - CHECKSUM_CHARS);
    if checksum(body).as_bytes().ct_eq(sum.as_bytes()).into() {
        Ok(())
    } else {
        Err(TokenFormatError::BadChecksum)
    }
}

/// The SHA-256 (hex) under which a token is stored and looked up.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time equality of two secrets of any length (compares their SHA-256 digests).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes())
        .ct_eq(&Sha256::digest(b.as_bytes()))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(a.starts_with("rw_"));
        assert_eq!(check_format(&a), Ok(()));
    }

    #[test]
    fn a_typo_fails_the_checksum() {
        let token = generate();
        let mut chars: Vec<char> = token.chars().collect();
        chars[5] = if chars[5] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(check_format(&typo), Err(TokenFormatError::BadChecksum));
        assert_eq!(
            check_format(&token[..TOKEN_LEN - 1]),
            Err(TokenFormatError::Malformed)
        );
        assert_eq!(
            check_format("ghp_abc"),
            Err(TokenFormatError::NotRewindToken)
        );
        assert_eq!(
            check_format(&format!("{}!", &token[..TOKEN_LEN - 1])),
            Err(TokenFormatError::Malformed)
        );
    }

    #[test]
    fn hashes_are_stable_hex_sha256() {
        assert_eq!(hash("rw_x"), hash("rw_x"));
        assert_eq!(hash("rw_x").len(), 64);
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
    }
}
