//! Giving freed heap memory back to the system (and having large blocks go back as soon as they
//! are freed), and asking the CPU to load memory ahead.
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

/// The size from which glibc's `malloc` maps each allocation on its own (and unmaps it when
/// freed) instead of carving it out of the heap: 1 MiB.
pub const MAP_FROM: usize = 1 << 20;

/// Has every allocation of [`MAP_FROM`] bytes or more mapped on its own, for the life of the
/// process (glibc `mallopt(M_MMAP_THRESHOLD)`). Each swap of the tables builds a new Service
/// index (a few MiB at 10,000 Services) and frees the old one once no worker reads it. By
/// default glibc raises its threshold to the size of the largest mapped block freed, so after
/// the first such free those indexes come from the heap, where 100 swaps a second left tens
/// of MiB resident that were free. Mapped, each goes back to the system when freed. Returns
/// whether glibc took the setting.
pub fn map_large_allocations() -> bool {
    // SAFETY: mallopt only sets a parameter of glibc's allocator, under its lock; it takes no
    // pointer, and allocations made before keep working (they are freed the way they came).
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_FROM as libc::c_int) == 1 }
}

/// Starts loading the cache line where `*r` starts into the CPU's caches without waiting for
/// it: a prefetch instruction, which, unlike a load, does not hold up the instructions after
/// it. Nothing is read: no value, no fault, no other effect than on the caches. Elsewhere than
/// on x86-64, nothing.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint with no architectural effect: it never faults, whatever
        // the address (a live reference's here), and reads nothing into the program. SSE, which
        // `_mm_prefetch` requires, is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((r as *const T).cast::<i8>()) }
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

    #[test]
    fn large_blocks_go_back_when_freed() {
        assert!(super::map_large_allocations());
        // A 4 MiB block freed: by glibc's default that raises the threshold to 4 MiB. Then 64
        // MiB in 2 MiB blocks, touched, freed: by default those would come from the heap and
        // stay there. Tests running beside this one allocate too, so it gets three tries to
        // see the drop.
        drop(std::hint::black_box(vec![1u8; 4 << 20]));
        let gone = (0..3).any(|_| {
            let blocks: Vec<Vec<u8>> = (0..32).map(|_| vec![1u8; 2 << 20]).collect();
            let held = super::resident();
            drop(blocks);
            held.saturating_sub(super::resident()) >= 48 << 20
        });
        assert!(gone, "freed 2 MiB blocks stayed resident");
    }
}
