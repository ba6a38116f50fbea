//! Sealed sessions (BEGIN's [`FLAG_SEALED`], end-to-end encryption; the design is
//! `docs/security.md`): what each role does with a key, or without one, and the
//! version's facts that the seal carries.
//!
//! In a sealed session every hash the two roles compare is a page *identity* (a keyed
//! MAC of the page hash, [`EncryptionKey::page_identity`]), pages travel as SPAGE
//! frames (`nonce ‖ ciphertext ‖ tag`, with their identity), and the version's seal
//! (its [`Facts`], encrypted and bound to the replica path and version number) comes in
//! a SEAL frame just before COMMIT. Three parts play in one:
//!
//! - an origin with the key ([`Sealing::Seal`], a client's push) maps its page hashes to
//!   identities, seals each page it sends on the engine's thread, and makes the seal;
//! - a side that keeps what it cannot read (a store; no key, a target that
//!   [keeps sealed pages](super::PageTarget::keeps_sealed)) stores each sealed page under
//!   the identity it came with and the seal with the version, and relays both as they
//!   are when it is the origin of a pull ([`Sealing::Relay`]);
//! - a replica with the key ([`Opening`], a client's pull) opens each page under its
//!   identity, recomputes the identity from the plaintext, and commits only when the
//!   seal opens for the replica and version it asked for and names the digests of what
//!   it built, both over identities and over the plaintext.

use crate::crypt::EncryptionKey;
use crate::digest::{DigestForm, HASH_BYTES, Hash};
use crate::protocol::MAX_TEXT_BYTES;
use crate::{Error, Result};

/// BEGIN flag: a sealed session. Every hash is an identity, pages travel as SPAGE, and
/// SEAL comes before COMMIT; PAGE and ZPAGE are refused in it, SPAGE and SEAL outside it.
pub const FLAG_SEALED: u8 = 0x04;

// The codec restates the seal's overhead (it imports nothing but `digest` and `error`):
// the two must agree, or every SPAGE would be refused.
const _: () = assert!(crate::crypt::SEAL_OVERHEAD == crate::protocol::SEAL_OVERHEAD);

/// How an origin seals its session.
pub enum Sealing<'a> {
    /// The origin has the key: it maps its page hashes to identities, seals the pages it
    /// sends, and seals the version's facts for `version` of `replica`.
    Seal {
        /// The key.
        key: &'a EncryptionKey,
        /// The replica path the seal is bound to.
        replica: &'a str,
        /// The version number the seal is bound to: the one the store will give it.
        version: u64,
        /// The commit message, sealed with the facts.
        message: &'a str,
    },
    /// The origin is a store that keeps what it cannot read: its page hashes are
    /// identities and its pages are sealed already; `seal` is the version's seal as it
    /// was stored.
    Relay {
        /// The stored seal.
        seal: Vec<u8>,
    },
}

/// A replica with the key: it opens what it is sent, for `version` of `replica`.
pub struct Opening<'a> {
    /// The key.
    pub key: &'a EncryptionKey,
    /// The replica path the version's seal must be bound to.
    pub replica: &'a str,
    /// The version number the seal must be bound to: the one asked for.
    pub version: u64,
}

/// What a version's seal holds: the facts about it that only a key holder may read or
/// make, checked by every pull before it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Page size in bytes.
    pub page_size: u32,
    /// Page count.
    pub page_count: u32,
    /// Digest 1 over the plaintext page hashes: what `verify` of the database prints.
    pub digest: Hash,
    /// The form of `identity_digest`: the session's.
    pub identity_form: DigestForm,
    /// The digest over the page identities, in `identity_form`: what the store checked.
    pub identity_digest: Hash,
    /// The commit message.
    pub message: String,
}

/// The first byte of encoded facts: their format.
const FACTS_FORMAT: u8 = 1;

/// The bytes of encoded facts before the message.
const FACTS_HEAD: usize = 1 + 4 + 4 + HASH_BYTES + 1 + HASH_BYTES;

impl Facts {
    /// The facts as the seal encrypts them: `u8 format (1)`, `u32 page_size`,
    /// `u32 page_count`, `hash digest`, `u8 form` (1: digest 1, 2: chunked),
    /// `hash identity_digest`, then the message's UTF-8 (at most 4096 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_TEXT_BYTES);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = Vec::with_capacity(FACTS_HEAD + end);
        out.push(FACTS_FORMAT);
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.page_count.to_be_bytes());
        out.extend_from_slice(&self.digest);
        out.push(match self.identity_form {
            DigestForm::One => 1,
            DigestForm::Chunked => 2,
        });
        out.extend_from_slice(&self.identity_digest);
        out.extend_from_slice(&self.message.as_bytes()[..end]);
        out
    }

    /// Facts from an opened seal. The seal authenticated them, so malformed facts are
    /// a key holder's bug or another format: a verification error either way.
    pub fn decode(bytes: &[u8]) -> Result<Facts> {
        let bad = |why: &str| Error::Verification(format!("the version's seal holds {why}"));
        if bytes.len() < FACTS_HEAD {
            return Err(bad("too few bytes"));
        }
        if bytes[0] != FACTS_FORMAT {
            return Err(bad(&format!("facts of unknown format {}", bytes[0])));
        }
        let u32_at =
            |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes in range"));
        let hash_at =
            |at: usize| -> Hash { bytes[at..at + HASH_BYTES].try_into().expect("in range") };
        let identity_form = match bytes[9 + HASH_BYTES] {
            1 => DigestForm::One,
            2 => DigestForm::Chunked,
            other => return Err(bad(&format!("unknown digest form {other}"))),
        };
        let message = String::from_utf8(bytes[FACTS_HEAD..].to_vec())
            .map_err(|_| bad("a commit message that is not UTF-8"))?;
        Ok(Facts {
            page_size: u32_at(1),
            page_count: u32_at(5),
            digest: hash_at(9),
            identity_form,
            identity_digest: hash_at(10 + HASH_BYTES),
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_round_trip_and_refuse_what_they_are_not() {
        let facts = Facts {
            page_size: 4096,
            page_count: 3,
            digest: [1; 32],
            identity_form: DigestForm::Chunked,
            identity_digest: [2; 32],
            message: "before migration ✓".into(),
        };
        let bytes = facts.encode();
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..9], [0, 0, 0x10, 0, 0, 0, 0, 3]);
        assert_eq!(Facts::decode(&bytes).expect("decodes"), facts);
        assert!(Facts::decode(&bytes[..FACTS_HEAD - 1]).is_err());
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(Facts::decode(&other).is_err());
        let mut form = bytes.clone();
        form[9 + HASH_BYTES] = 0;
        assert!(Facts::decode(&form).is_err());
        let mut utf8 = bytes;
        utf8.push(0xff);
        assert!(Facts::decode(&utf8).is_err());
    }
}
