//! Giving freed heap memory back to the system, and asking the CPU to load memory ahead.
//!
//! The control plane's large transient work (the first list of 100,000 pods and 100,000
//! endpoints, a relist, the tables a handover serializes) leaves glibc's heap holding pages
//! it has freed but not returned: the resident set stays at its high-water mark long after
//! the tables are built. vswitchd asks glibc to return them once such work is done.

/// Returns free heap memory to the system (glibc `malloc_trim(0)`); the bytes of resident
/// memory that went, as `/proc/self/statm` saw it before and after.
pub fn trim() -> u64 {
    let before = resident();
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks; it takes no
    // pointer and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    before.saturating_sub(resident())
}

/// Starts loading the cache lines of `*r` (up to 128 bytes: two lines) into the CPU's caches
/// without waiting for them: a prefetch instruction, which, unlike a load, does not hold up
/// the instructions after it. Nothing is read: no value, no fault, no other effect than on the
/// caches. Elsewhere than on x86-64, nothing.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = (r as *const T).cast::<i8>();
        let second = p.wrapping_add(64);
        // SAFETY: a prefetch is a hint with no architectural effect: it never faults, whatever
        // the address (both are within or just past a live reference here), and reads nothing
        // into the program. SSE, which `_mm_prefetch` requires, is part of x86-64.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            if std::mem::size_of::<T>() > 64 {
                _mm_prefetch::<_MM_HINT_T0>(second);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// Resident bytes (`/proc/self/statm`'s second field, in pages).
fn resident() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    let page = match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p as u64,
        _ => 4096,
    };
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |p| p * page)
}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_returns_freed_memory() {
        // 64 MiB in small blocks (below the mmap threshold, so from the heap), touched, freed.
        let blocks: Vec<Vec<u8>> = (0..16_384).map(|_| vec![1u8; 4096]).collect();
        drop(blocks);
        // Whatever else runs in this test binary, trim never fails and never panics.
        let _ = super::trim();
        assert!(super::resident() > 0);
    }
}
