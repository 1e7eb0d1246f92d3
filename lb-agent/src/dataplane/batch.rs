//! Whole-map passes over the large hash maps (conntrack, affinity) in a few syscalls.
//!
//! aya 0.14 iterates a map one element at a time: `BPF_MAP_GET_NEXT_KEY` then
//! `BPF_MAP_LOOKUP_ELEM`, two syscalls per entry. At 100k tracked flows that is 200k syscalls
//! and most of a second for every pass, and the agent makes one on every backend removal (the
//! conntrack flush that keeps UDP flows from being blackholed) and one per maintenance interval
//! (expiry and the lc/wlc recount). The kernel's batch commands (Linux 5.6; xlb needs 5.17)
//! copy thousands of entries per call instead; aya does not wrap them yet, so this module does,
//! with the kernel's own `bpf_attr` layout from aya-obj.

use std::{
    borrow::Borrow,
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries requested per `BPF_MAP_LOOKUP_BATCH` call: ~300 KiB of conntrack keys and values,
/// few enough calls at the default capacity and a small buffer.
const LOOKUP_BATCH_ENTRIES: usize = 4096;

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` whose pointers (set by the callers
    // below) point at buffers that outlive the call and are as large as `count` says.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn raw_fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a plain C union of integers; all zeroes is its documented default.
    unsafe { MaybeUninit::<bpf_attr>::zeroed().assume_init() }
}

/// Every entry of a hash map (plain or LRU), read with `BPF_MAP_LOOKUP_BATCH`.
///
/// Like any walk of a live map, it may miss entries inserted or see entries deleted while it
/// runs; every caller tolerates that (an entry missed now is handled at the next pass).
/// Typed through aya's `HashMap`, which checked the map's key and value sizes against `K` and
/// `V` when it was opened: the kernel copies entries back to back at exactly those sizes.
pub fn dump<T: Borrow<MapData>, K: Pod, V: Pod>(map: &HashMap<T, K, V>) -> io::Result<Vec<(K, V)>> {
    let fd = raw_fd(map.map());
    let mut capacity = LOOKUP_BATCH_ENTRIES;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The batch token is the kernel's bucket cursor (a u32 for hash maps); 8 bytes covers it.
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    let mut out = Vec::new();
    loop {
        keys.resize_with(capacity, MaybeUninit::uninit);
        values.resize_with(capacity, MaybeUninit::uninit);
        let mut attr = zeroed_attr();
        // SAFETY: writing the `batch` member of the union, the one BPF_MAP_LOOKUP_BATCH reads.
        let batch = unsafe { &mut attr.batch };
        batch.map_fd = fd;
        batch.in_batch = if first {
            0
        } else {
            &mut token_in as *mut u64 as u64
        };
        batch.out_batch = &mut token_out as *mut u64 as u64;
        batch.keys = keys.as_mut_ptr() as u64;
        batch.values = values.as_mut_ptr() as u64;
        batch.count = capacity as u32;
        let result = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: as above; the kernel wrote back how many entries it copied.
        let count = unsafe { attr.batch.count } as usize;
        let done = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One hash bucket holds more entries than the buffer: retry it with a bigger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count == 0 => {
                capacity *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        out.extend(keys[..count].iter().zip(&values[..count]).map(|(k, v)| {
            // SAFETY: the kernel initialised the first `count` keys and values, and K and V
            // are Pod: any bytes are valid.
            unsafe { (k.assume_init(), v.assume_init()) }
        }));
        if done {
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}

/// Deletes `keys` from a hash map with `BPF_MAP_DELETE_BATCH`; keys already gone (expired,
/// evicted, deleted by the program) are skipped. Returns how many were deleted here.
pub fn delete<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &mut HashMap<T, K, V>,
    keys: &[K],
) -> io::Result<usize> {
    let fd = raw_fd(map.map());
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = zeroed_attr();
        // SAFETY: writing the `batch` member, the one BPF_MAP_DELETE_BATCH reads.
        let batch = unsafe { &mut attr.batch };
        batch.map_fd = fd;
        batch.keys = rest.as_ptr() as u64;
        batch.count = rest.len() as u32;
        let result = sys_bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr);
        // SAFETY: the kernel reports how many keys it deleted before stopping.
        let count = unsafe { attr.batch.count } as usize;
        deleted += count;
        match result {
            Ok(()) => return Ok(deleted),
            // The key at `count` was not there: step over it and go on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[count + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// These create real kernel maps: they need root (CAP_BPF) and fail loudly without it.
#[cfg(test)]
mod tests {
    use aya::maps::Map;
    use aya_obj::generated::bpf_map_type;

    use super::*;

    /// More entries than one lookup batch holds, so a dump takes several calls.
    const ENTRIES: u32 = 3 * LOOKUP_BATCH_ENTRIES as u32 + 123;

    fn hash_map(map_type: bpf_map_type) -> HashMap<MapData, u32, u64> {
        let obj = aya_obj::Map::new_from_params(map_type as u32, 4, 8, 2 * ENTRIES, 0);
        let data = MapData::create(obj, "xlb_batch_test", None)
            .expect("create a BPF map (needs root: run as root or with CAP_BPF)");
        let map = match map_type {
            bpf_map_type::BPF_MAP_TYPE_LRU_HASH => Map::LruHashMap(data),
            _ => Map::HashMap(data),
        };
        HashMap::try_from(map).unwrap()
    }

    fn filled(map_type: bpf_map_type) -> HashMap<MapData, u32, u64> {
        let mut map = hash_map(map_type);
        for k in 0..ENTRIES {
            map.insert(k, k as u64 * 7, 0).unwrap();
        }
        map
    }

    #[test]
    fn dump_returns_every_entry_across_batches() {
        for map_type in [
            bpf_map_type::BPF_MAP_TYPE_HASH,
            bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
        ] {
            let map = filled(map_type);
            let mut entries = dump(&map).unwrap();
            entries.sort();
            let want: Vec<(u32, u64)> = (0..ENTRIES).map(|k| (k, k as u64 * 7)).collect();
            assert_eq!(entries, want, "{map_type:?}");
        }
    }

    #[test]
    fn dump_of_an_empty_map_is_empty() {
        assert!(
            dump(&hash_map(bpf_map_type::BPF_MAP_TYPE_HASH))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn delete_skips_keys_that_are_already_gone() {
        let mut map = filled(bpf_map_type::BPF_MAP_TYPE_LRU_HASH);
        // Every third key goes, with absent keys among them (at the start, in the middle and at
        // the end), as when the program or the LRU removed entries after the dump.
        let mut doomed: Vec<u32> = vec![ENTRIES + 1];
        doomed.extend((0..ENTRIES).filter(|k| k % 3 == 0));
        doomed.insert(doomed.len() / 2, ENTRIES + 2);
        doomed.push(ENTRIES + 3);
        let deleted = delete(&mut map, &doomed).unwrap();
        assert_eq!(deleted as u32, ENTRIES.div_ceil(3));
        let mut left: Vec<u32> = dump(&map).unwrap().into_iter().map(|(k, _)| k).collect();
        left.sort();
        let want: Vec<u32> = (0..ENTRIES).filter(|k| k % 3 != 0).collect();
        assert_eq!(left, want);
        assert_eq!(delete(&mut map, &[]).unwrap(), 0);
    }
}
