//! libpcap's filter compiler and BPF interpreter: the one place this crate calls C.
//!
//! tcpdump's language (pcap-filter(7)) is defined by libpcap's compiler, so the capture filter
//! uses it rather than imitating it: `pcap_compile` on a dead Ethernet handle turns the text
//! into a classic BPF program once, when a session starts; the program is copied into a Rust
//! vector and libpcap's own copy freed, and each packet is then run through libpcap's
//! `bpf_filter`, which reads the bytes in place, allocates nothing and never reads past the
//! length it is given. The crate links libpcap statically in the image (see build.rs).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::Mutex;

/// One classic BPF instruction, as `struct bpf_insn` in <pcap/bpf.h>.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BpfInsn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct bpf_program`.
#[repr(C)]
struct BpfProgram {
    bf_len: c_uint,
    bf_insns: *mut BpfInsn,
}

/// `DLT_EN10MB`: Ethernet frames.
const DLT_EN10MB: c_int = 1;
/// `PCAP_NETMASK_UNKNOWN`: `ip broadcast` then says it needs a netmask.
const PCAP_NETMASK_UNKNOWN: u32 = 0xffff_ffff;
/// The snap length the program is compiled for, which is what it returns on a match: more than
/// any frame the switch handles (a 64 KiB super-frame with its headers).
const SNAPLEN: c_int = 262_144;

// Linked by build.rs: the shared library, or the static archives for the image.
extern "C" {
    fn pcap_open_dead(linktype: c_int, snaplen: c_int) -> *mut c_void;
    fn pcap_close(p: *mut c_void);
    fn pcap_compile(
        p: *mut c_void,
        fp: *mut BpfProgram,
        text: *const c_char,
        optimize: c_int,
        netmask: u32,
    ) -> c_int;
    fn pcap_geterr(p: *mut c_void) -> *mut c_char;
    fn pcap_freecode(fp: *mut BpfProgram);
    fn bpf_filter(insns: *const BpfInsn, pkt: *const u8, wirelen: c_uint, buflen: c_uint)
        -> c_uint;
}

/// libpcap before 1.8 kept the compiler's state in globals; one compile at a time costs
/// nothing here (a session start) and holds with any version.
static COMPILE: Mutex<()> = Mutex::new(());

/// A compiled BPF program for Ethernet frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    insns: Vec<BpfInsn>,
}

impl Program {
    /// Compiles tcpdump filter text, with libpcap's optimiser. The error is libpcap's message.
    /// Host, network, port and protocol names are resolved by libpcap through the C library,
    /// which may ask DNS.
    pub fn compile(text: &str) -> Result<Program, String> {
        let c = CString::new(text).map_err(|_| "the filter contains a NUL byte".to_string())?;
        let _one = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: pcap_open_dead takes plain integers and returns an owned handle or NULL.
        let p = unsafe { pcap_open_dead(DLT_EN10MB, SNAPLEN) };
        if p.is_null() {
            return Err("libpcap could not open a handle to compile with".into());
        }
        let mut prog = BpfProgram {
            bf_len: 0,
            bf_insns: std::ptr::null_mut(),
        };
        // SAFETY: p is a live handle, prog a valid out-parameter and c a NUL-terminated string
        // that outlives the call; libpcap serialises nothing else on this handle.
        let rc = unsafe { pcap_compile(p, &mut prog, c.as_ptr(), 1, PCAP_NETMASK_UNKNOWN) };
        let out = if rc < 0 {
            // SAFETY: pcap_geterr returns the handle's NUL-terminated error buffer, valid until
            // the handle is closed below; it is copied out first.
            Err(unsafe { CStr::from_ptr(pcap_geterr(p)) }
                .to_string_lossy()
                .into_owned())
        } else {
            let insns = if prog.bf_insns.is_null() {
                Vec::new()
            } else {
                // SAFETY: on success bf_insns points to bf_len instructions that libpcap
                // allocated and that stay valid until pcap_freecode below.
                unsafe { std::slice::from_raw_parts(prog.bf_insns, prog.bf_len as usize) }.to_vec()
            };
            // SAFETY: prog was filled by a successful pcap_compile and is freed once.
            unsafe { pcap_freecode(&mut prog) };
            Ok(Program { insns })
        };
        // SAFETY: p came from pcap_open_dead and is not used after this.
        unsafe { pcap_close(p) };
        let prog = out?;
        if prog.insns.is_empty() {
            return Err("libpcap compiled it to an empty program".into());
        }
        Ok(prog)
    }

    /// Whether a packet matches: `captured` is the bytes at hand (from the Ethernet header),
    /// `wire_len` the packet's whole length, which `len`, `less` and `greater` test. A load
    /// past `captured` makes the packet not match, as in tcpdump with a short snap length.
    #[inline]
    pub fn matches(&self, captured: &[u8], wire_len: u32) -> bool {
        let buflen = captured.len().min(u32::MAX as usize) as c_uint;
        // SAFETY: insns is a program libpcap's compiler produced (bpf_filter checks every load
        // against buflen and every jump lies within the program, as the compiler emits them);
        // captured is valid for buflen bytes and only read.
        unsafe { bpf_filter(self.insns.as_ptr(), captured.as_ptr(), wire_len, buflen) != 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_and_runs() {
        let p = Program::compile("ip").unwrap();
        let mut f = [0u8; 34];
        f[12] = 0x08;
        assert!(p.matches(&f, 34));
        f[12] = 0x86;
        f[13] = 0xdd;
        assert!(!p.matches(&f, 34));
        assert!(!p.matches(&[], 0), "a load past the bytes does not match");
    }

    #[test]
    fn errors_are_libpcaps() {
        assert!(Program::compile("tcp and")
            .unwrap_err()
            .contains("syntax error"));
        assert!(Program::compile("a\0b").unwrap_err().contains("NUL"));
    }
}
