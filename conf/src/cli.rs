//! What the command-line tools (`vswitchctl`, `vswitch-lab`) share.

/// Makes a closed standard output end the program quietly, as for any Unix filter: `vswitchctl
/// ports --json | head -5` exits when `head` has read enough, instead of panicking in
/// `println!` ("failed printing to stdout: Broken pipe"; Rust ignores SIGPIPE). The exit status
/// is 141, a shell's for a process ended by SIGPIPE. Every other panic is reported as before.
pub fn quiet_on_broken_pipe() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if is_broken_pipe(payload) {
            std::process::exit(141);
        }
        previous(info)
    }));
}

fn is_broken_pipe(panic_message: &str) -> bool {
    panic_message.starts_with("failed printing to stdout") && panic_message.contains("Broken pipe")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_print_to_a_closed_pipe_counts() {
        assert!(super::is_broken_pipe(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(!super::is_broken_pipe("index out of bounds"));
        assert!(!super::is_broken_pipe(
            "failed printing to stdout: No space left on device"
        ));
    }
}
