//! The storage layout of published config: the head, each slot's state and settings record,
//! the epoch counter, and the buckets of entries (how each is encoded, and which entries a head
//! sees).

use crate::store::{
    compare_and_swap, slot_settings_key, slot_state_key, Change, SetError, SharedStore, BUCKET_TAG,
    EPOCH_KEY, EPOCH_TAG, HEAD_TAG, RECORD_TAG, STATE_TAG,
};

/// Entry kinds: an account or key by SID; a Bearer token by digest.
pub(super) const PRINCIPAL: u8 = b'p';
pub(super) const TOKEN: u8 = b't';
/// A slot starts with `2^MIN_BUCKET_BITS` buckets and grows up to `2^MAX_BUCKET_BITS`.
pub const MIN_BUCKET_BITS: u8 = 8;
pub const MAX_BUCKET_BITS: u8 = 22;

/// The published version, where it lives, and when the control plane was last heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    pub contacted_at_s: u64,
    /// The version's entries are those of `slot` written at an epoch in `floor..=epoch`.
    pub floor: u64,
    pub epoch: u64,
    pub slot: u8,
    /// The slot has `2^bits` buckets.
    pub bits: u8,
}

impl Head {
    pub(super) fn same_config(&self, other: &Head) -> bool {
        (self.version, self.floor, self.epoch, self.slot, self.bits)
            == (
                other.version,
                other.floor,
                other.epoch,
                other.slot,
                other.bits,
            )
    }
}

pub(super) fn le_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_le_bytes)
}

pub(super) fn valid_bits(bits: u8) -> bool {
    (MIN_BUCKET_BITS..=MAX_BUCKET_BITS).contains(&bits)
}

pub(super) fn encode_head(h: Head) -> [u8; 35] {
    let mut v = [0u8; 35];
    v[0] = HEAD_TAG;
    v[1..9].copy_from_slice(&h.version.to_le_bytes());
    v[9..17].copy_from_slice(&h.contacted_at_s.to_le_bytes());
    v[17..25].copy_from_slice(&h.floor.to_le_bytes());
    v[25..33].copy_from_slice(&h.epoch.to_le_bytes());
    v[33] = h.slot;
    v[34] = h.bits;
    v
}

pub(super) fn decode_head(b: &[u8]) -> Option<Head> {
    match b {
        [HEAD_TAG, rest @ ..] if rest.len() == 34 && rest[32] < 2 && valid_bits(rest[33]) => {
            Some(Head {
                version: le_u64(&rest[..8])?,
                contacted_at_s: le_u64(&rest[8..16])?,
                floor: le_u64(&rest[16..24])?,
                epoch: le_u64(&rest[24..32])?,
                slot: rest[32],
                bits: rest[33],
            })
        }
        _ => None,
    }
}

/// A slot's state: its entries are those at epochs from `floor` on, the newest written at
/// `epoch`; it is complete at version `base` (or, while it is being written, was complete at:
/// applying every change after `base` brings it to the newest version); `2^bits` buckets
/// holding `count` live entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SlotState {
    pub(super) floor: u64,
    pub(super) epoch: u64,
    pub(super) base: u64,
    pub(super) bits: u8,
    pub(super) count: u64,
}

pub(super) fn read_state(store: &dyn SharedStore, slot: u8) -> Option<SlotState> {
    let (bytes, _) = store.get(&slot_state_key(slot)).ok()??;
    match bytes.as_slice() {
        [STATE_TAG, rest @ ..] if rest.len() == 33 && valid_bits(rest[24]) => Some(SlotState {
            floor: le_u64(&rest[..8])?,
            epoch: le_u64(&rest[8..16])?,
            base: le_u64(&rest[16..24])?,
            bits: rest[24],
            count: le_u64(&rest[25..])?,
        }),
        _ => None,
    }
}

pub(super) fn write_state(
    store: &dyn SharedStore,
    slot: u8,
    st: SlotState,
) -> Result<(), SetError> {
    let mut v = [0u8; 34];
    v[0] = STATE_TAG;
    v[1..9].copy_from_slice(&st.floor.to_le_bytes());
    v[9..17].copy_from_slice(&st.epoch.to_le_bytes());
    v[17..25].copy_from_slice(&st.base.to_le_bytes());
    v[25] = st.bits;
    v[26..].copy_from_slice(&st.count.to_le_bytes());
    store.set(&slot_state_key(slot), &v, 0)
}

/// Hands out a new epoch (compare-and-swap on a counter, so two VMs never share one); `None`
/// if the store fails or holds something else there.
pub(super) fn next_epoch(store: &dyn SharedStore) -> Option<u64> {
    compare_and_swap(store, EPOCH_KEY, 8, |value| {
        let last = match value {
            Some([EPOCH_TAG, rest @ ..]) => le_u64(rest)?,
            Some(_) => return None,
            None => 0,
        };
        let next = last.saturating_add(1);
        let mut v = vec![0u8; 9];
        v[0] = EPOCH_TAG;
        v[1..].copy_from_slice(&next.to_le_bytes());
        Some(Change::Write(v, next))
    })
}

/// A record: [`RECORD_TAG`], its epoch (8 bytes, little-endian), the payload.
pub(super) fn record(epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.push(RECORD_TAG);
    v.extend_from_slice(&epoch.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// The slot's settings record (its version's settings, APIs and limits as JSON) if it was
/// written at an epoch in `floor..=upto`.
pub(super) fn read_settings(
    store: &dyn SharedStore,
    slot: u8,
    floor: u64,
    upto: u64,
) -> Option<Vec<u8>> {
    let (bytes, _) = store.get(&slot_settings_key(slot)).ok()??;
    match bytes.as_slice() {
        [RECORD_TAG, rest @ ..] if rest.len() >= 8 => {
            let epoch = le_u64(&rest[..8])?;
            (floor..=upto).contains(&epoch).then(|| rest[8..].to_vec())
        }
        _ => None,
    }
}

/// The bucket an entry's name hashes to (FNV-1a, then a 64-bit finalizer so the low bits mix).
/// SIDs are chosen by the control plane and digests are SHA-256 outputs: nobody picks them to
/// collide.
pub(super) fn bucket_of(kind: u8, id: &[u8], bits: u8) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(kind).chain(id.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    let mask = (1u64 << bits.min(MAX_BUCKET_BITS)) - 1;
    u32::try_from(h & mask).unwrap_or(0)
}

/// One entry of a bucket, borrowed from its encoded value.
pub(super) struct EntryRef<'a> {
    pub(super) kind: u8,
    pub(super) id: &'a [u8],
    pub(super) epoch: u64,
    pub(super) payload: &'a [u8],
}

/// The entries of an encoded bucket: [`BUCKET_TAG`], then per entry its kind, the length of its
/// id (1 byte), the id, its epoch (8 bytes), the length of its payload (4 bytes), the payload
/// (integers little-endian). Stops at anything malformed.
pub(super) struct Entries<'a>(&'a [u8]);

pub(super) fn entries(value: &[u8]) -> Entries<'_> {
    match value {
        [BUCKET_TAG, rest @ ..] => Entries(rest),
        _ => Entries(&[]),
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = EntryRef<'a>;

    fn next(&mut self) -> Option<EntryRef<'a>> {
        let b = self.0;
        let parsed = (|| {
            let (&kind, rest) = b.split_first()?;
            let (&id_len, rest) = rest.split_first()?;
            let id = rest.get(..usize::from(id_len))?;
            let rest = rest.get(usize::from(id_len)..)?;
            let epoch = le_u64(rest.get(..8)?)?;
            let len = <[u8; 4]>::try_from(rest.get(8..12)?).ok()?;
            let len = usize::try_from(u32::from_le_bytes(len)).ok()?;
            let payload = rest.get(12..12usize.checked_add(len)?)?;
            let rest = rest.get(12 + len..)?;
            Some((
                EntryRef {
                    kind,
                    id,
                    epoch,
                    payload,
                },
                rest,
            ))
        })();
        match parsed {
            Some((e, rest)) => {
                self.0 = rest;
                Some(e)
            }
            None => {
                self.0 = &[];
                None
            }
        }
    }
}

/// An entry a writer holds while it rewrites a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) kind: u8,
    pub(super) id: Vec<u8>,
    pub(super) epoch: u64,
    pub(super) payload: Vec<u8>,
}

pub(super) fn encode_bucket(entries: &[Entry]) -> Vec<u8> {
    if entries.is_empty() {
        return Vec::new(); // an empty value: the name stays, its memory goes
    }
    let size: usize = entries
        .iter()
        .map(|e| 14 + e.id.len() + e.payload.len())
        .sum();
    let mut v = Vec::with_capacity(1 + size);
    v.push(BUCKET_TAG);
    for e in entries {
        v.push(e.kind);
        v.push(u8::try_from(e.id.len()).unwrap_or(u8::MAX));
        v.extend_from_slice(&e.id);
        v.extend_from_slice(&e.epoch.to_le_bytes());
        let len = u32::try_from(e.payload.len()).unwrap_or(u32::MAX);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&e.payload);
    }
    v
}

/// SIDs name shared-data keys: only the SID alphabet is looked up at all.
pub(super) fn plausible_sid(sid: &[u8]) -> Option<&str> {
    let ok = !sid.is_empty()
        && sid.len() <= 64
        && sid
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if ok {
        std::str::from_utf8(sid).ok()
    } else {
        None
    }
}
