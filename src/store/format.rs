//! What the store file holds, and how two versions of it are merged when a
//! crash left a newer one in a temporary file.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What is kept for one tenant.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) refresh_token: String,
    /// True once the token endpoint has refused this token (`invalid_grant`).
    #[serde(default)]
    pub(super) rejected: bool,
    /// The store's write counter when this entry was written: of two
    /// copies of an entry, the higher one is newer (0: written by a release
    /// that did not count).
    #[serde(default)]
    pub(super) seq: u64,
    #[serde(default)]
    pub(super) updated_at: String,
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub(super) struct StoreFile {
    pub(super) version: u32,
    /// Writes so far; each one takes the next number.
    #[serde(default)]
    pub(super) seq: u64,
    pub(super) tenants: BTreeMap<String, Entry>,
    /// SHA-256 (hex) of every config seed ever presented to the token
    /// endpoint: a seed is single-use like any refresh token, and
    /// presenting a spent one again gains nothing and may look like a
    /// stolen token to Criteo.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(super) presented_seeds: BTreeSet<String>,
}

impl std::fmt::Debug for StoreFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFile")
            .field("seq", &self.seq)
            .field("tenants", &self.tenants.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl StoreFile {
    pub(super) fn empty() -> Self {
        Self {
            version: 1,
            ..Self::default()
        }
    }

    /// Records `token` for `tenant` as the newest write.
    pub(super) fn set(&mut self, tenant: &str, token: &str, rejected: bool) {
        self.version = 1;
        self.seq += 1;
        self.tenants.insert(
            tenant.to_owned(),
            Entry {
                refresh_token: token.to_owned(),
                rejected,
                seq: self.seq,
                updated_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            },
        );
    }

    pub(super) fn record_seed(&mut self, seed: &str) {
        self.presented_seeds.insert(seed_hash(seed));
    }

    pub(super) fn seed_presented(&self, seed: &str) -> bool {
        self.presented_seeds.contains(&seed_hash(seed))
    }

    /// Folds in `other`, a complete temporary file left by a crash: for
    /// each tenant the newer entry wins, and every seed recorded in either
    /// stays recorded. True when anything was taken from `other`.
    pub(super) fn absorb(&mut self, other: StoreFile) -> bool {
        let mut taken = false;
        self.seq = self.seq.max(other.seq);
        for (tenant, theirs) in other.tenants {
            match self.tenants.get(&tenant) {
                Some(ours) if !newer(&theirs, ours) => {}
                _ => {
                    self.tenants.insert(tenant, theirs);
                    taken = true;
                }
            }
        }
        for seed in other.presented_seeds {
            taken |= self.presented_seeds.insert(seed);
        }
        taken
    }
}

/// Whether the temporary file's `theirs` should replace `ours`. Entries
/// written by this release differ in `seq`. Between entries of an older
/// release (both 0), a token Criteo has not refused wins, then the later
/// one; a tie goes to the temporary file, which was written after the
/// store file it failed to replace.
fn newer(theirs: &Entry, ours: &Entry) -> bool {
    let key = |e: &Entry| (e.seq, !e.rejected, e.updated_at.clone());
    match key(theirs).cmp(&key(ours)) {
        Ordering::Greater => true,
        Ordering::Equal => theirs.refresh_token != ours.refresh_token,
        Ordering::Less => false,
    }
}

pub(super) fn seed_hash(seed: &str) -> String {
    hex::encode(Sha256::digest(seed.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, bool, u64)]) -> StoreFile {
        let mut f = StoreFile::empty();
        for &(tenant, token, rejected, seq) in entries {
            f.tenants.insert(
                tenant.into(),
                Entry {
                    refresh_token: token.into(),
                    rejected,
                    seq,
                    updated_at: "2026-01-01T00:00:00Z".into(),
                },
            );
            f.seq = f.seq.max(seq);
        }
        f
    }

    fn token(f: &StoreFile, tenant: &str) -> String {
        f.tenants[tenant].refresh_token.clone()
    }

    #[test]
    fn the_higher_sequence_wins_per_tenant() {
        let mut main = file(&[("a", "a-5", false, 5), ("b", "b-6", false, 6)]);
        let tmp = file(&[
            ("a", "a-7", false, 7),
            ("b", "b-4", false, 4),
            ("c", "c-7", false, 7),
        ]);
        assert!(main.absorb(tmp));
        assert_eq!(token(&main, "a"), "a-7");
        assert_eq!(token(&main, "b"), "b-6", "an older copy never wins");
        assert_eq!(
            token(&main, "c"),
            "c-7",
            "a tenant only the temp file knows"
        );
        assert_eq!(main.seq, 7, "the next write counts on from the newest");
    }

    #[test]
    fn a_rejection_with_a_higher_sequence_wins() {
        let mut main = file(&[("a", "a-1", false, 1)]);
        assert!(main.absorb(file(&[("a", "a-1", true, 2)])));
        assert!(main.tenants["a"].rejected);
    }

    #[test]
    fn an_identical_copy_changes_nothing() {
        let mut main = file(&[("a", "a-3", false, 3)]);
        assert!(!main.absorb(file(&[("a", "a-3", false, 3)])));
    }

    #[test]
    fn between_unnumbered_entries_an_unrefused_token_then_the_temp_file_wins() {
        let mut main = file(&[("a", "old", true, 0), ("b", "b-old", false, 0)]);
        let tmp = file(&[("a", "new", false, 0), ("b", "b-new", false, 0)]);
        assert!(main.absorb(tmp));
        assert_eq!(token(&main, "a"), "new");
        assert_eq!(token(&main, "b"), "b-new");
    }

    #[test]
    fn seeds_recorded_in_either_copy_stay_recorded() {
        let mut main = file(&[]);
        main.record_seed("seed-1");
        let mut tmp = file(&[]);
        tmp.record_seed("seed-2");
        assert!(main.absorb(tmp));
        assert!(main.seed_presented("seed-1") && main.seed_presented("seed-2"));
        assert!(!main.seed_presented("seed-3"));
        let text = serde_json::to_string(&main).unwrap();
        assert!(!text.contains("seed-1"), "only hashes are kept");
    }
}
