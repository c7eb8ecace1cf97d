//! Identifiers. New events get UUIDv7 ids; every id Grizzly writes *because of* another event is
//! derived deterministically from its cause, so a replayed effect carries the same id and the
//! stream's `Nats-Msg-Id` de-duplication drops it.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A fresh, time-ordered event id.
pub fn new_event_id() -> String {
    Uuid::now_v7().to_string()
}

/// A deterministic id (UUID-shaped) derived from its parts.
pub fn derived_id(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        // Separator keeps ("ab","c") and ("a","bc") apart.
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Stable 64-bit hash of a key (partitioning); independent of process and platform.
pub fn stable_hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derived_id(&["a", "b"]), derived_id(&["a", "b"]));
        assert_ne!(derived_id(&["ab", "c"]), derived_id(&["a", "bc"]));
        assert_eq!(derived_id(&["x"]).len(), 36);
        assert_ne!(new_event_id(), new_event_id());
    }
}
