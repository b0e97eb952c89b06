//! Config published record by record in the shared store (Envoy shared data), so every worker
//! judges against the same version while each VM holds only a bounded cache, fed page by page
//! from the control plane's change feed.
//!
//! Layout (all values start with a tag byte; [`crate::store`] lists every key):
//! - `kg:cfg:head` → the version in force; the slot holding it, the range of epochs its records
//!   were written at (`floor..=epoch`) and its number of buckets; when the control plane was last
//!   heard from;
//! - `kg:cfg:<slot>:state` → the slot's floor and newest epoch, the version it is complete at,
//!   its number of buckets and of live entries;
//! - `kg:cfg:<slot>:meta:-` → the slot's settings record: the version's settings, API catalogue
//!   and limits (a [`crate::config::ConfigDoc`] without accounts and keys), with the epoch it
//!   was written at;
//! - `kg:cfg:<slot>:b:<n>` → bucket `n` of the slot's `2^bits`: every entry whose name hashes
//!   there, each `(kind, id, epoch, payload)`: an account or key ([`crate::config::AccountDoc`] /
//!   [`crate::config::KeyDoc`] JSON) by SID, or the SID of the key a Bearer token digest belongs
//!   to, by digest;
//! - `kg:cfg:epoch` → the last epoch handed out.
//!
//! Three parts: `layout` (how the head, a slot's state, its settings record, the epoch counter
//! and the buckets are encoded, and which entries a head sees), `update` (the writer: [`Update`]
//! brings the free slot to the newest version page by page and moves the head) and `read` (the
//! request side: [`read_head`], [`load_catalog`], [`SharedDirectory`] over a [`RecordCache`]).
//!
//! There are two slots; requests read only the one the head names, and only entries written at
//! an epoch in the head's range (anything else reads as absent). A new version is written into
//! the other slot, which is never read while it is written, and then the head moves: no request
//! sees a mix of two versions. The free slot is complete at an older version `X` (the one it held
//! when it was last in force), so bringing it to the new version `V` only needs what changed
//! after `X` ([`Update`]): a change of one key at a million keys writes one entry, not a million.
//!
//! Epochs (handed out by a counter, so always increasing): every update of a slot writes at a
//! fresh epoch, above the epoch of any head that ever named the slot, while entries it leaves
//! alone keep theirs. A request still holding the head that named the slot before (`floor..=e`)
//! therefore never sees an entry of the update (its epoch is above `e`); an entry the update
//! replaced or removed reads as absent to it, never as the newer version. The new head names
//! `floor..=fresh`: the unchanged entries and the update's. A slot with no usable state (first
//! start, the API catalogue changed, the control plane lost the changes since `X`, too many
//! entries per bucket) gets a new floor, which empties it at once, and is filled from scratch.
//!
//! Bounded under churn (Envoy's shared data cannot delete a key, only store an empty value):
//! entries live in a bounded set of bucket names per slot, sized by the number of live entries
//! (a slot holding more than [`MAX_LOAD`] per bucket is refilled with more buckets), never by
//! how many SIDs or secrets ever existed. A deleted SID's entry and the Bearer entry of a
//! rotated-out or deleted secret are removed from their bucket (a bucket left with nothing is
//! stored as an empty value); entries below the floor are dropped whenever their bucket is
//! written, and a refill from scratch sweeps the buckets the slot had before when it completes.
//!
//! Consistency across pages: each page is one read of the control plane at its own version. If
//! all pages of a walk report the same version, their union is that version. Otherwise the walk
//! is repeated for what changed after its first page's version (normally one small page), until
//! a walk sees one version. Until then, nothing is in force that was not complete.

mod layout;
mod read;
#[cfg(test)]
pub(crate) mod tests;
mod update;

pub use layout::{Head, MAX_BUCKET_BITS, MIN_BUCKET_BITS};
pub use read::{load_catalog, read_head, RecordCache, SharedDirectory, CACHE_CAPACITY};
#[cfg(any(test, feature = "testing"))]
pub use update::publish;
pub use update::{touch, valid_next_cursor, Rejection, Step, Update, MAX_LOAD, MAX_WALKS};
