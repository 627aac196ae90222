//! The CNI environment: which command, and the arguments the runtime passes in CNI_* variables.
//!
//! Each command requires only what the spec requires of the runtime for it, so DEL works with an
//! empty CNI_NETNS and STATUS/GC need nothing but CNI_COMMAND. CNI_PATH is read but never
//! required: vswitch delegates to no other plugin. Values are validated the way libcni validates
//! them before it calls a plugin, and every error names the variable.

use std::ffi::OsString;

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// Reads `CNI_COMMAND`.
pub fn command(getenv: &dyn Fn(&str) -> Option<OsString>) -> Result<Command, Error> {
    let c = var(getenv, "CNI_COMMAND")?.ok_or_else(|| Error::env("CNI_COMMAND", "not set"))?;
    Command::parse(&c).ok_or_else(|| {
        Error::env(
            "CNI_COMMAND",
            format!("unknown command {c:?} (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"),
        )
    })
}

/// The per-invocation arguments, like the reference plugins' `skel.CmdArgs`. Fields a command
/// does not require are empty when the runtime did not set them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdArgs {
    pub container_id: String,
    /// Empty when not given (allowed for DEL only).
    pub netns: String,
    pub ifname: String,
    /// Raw CNI_ARGS; see [`CniArgs::parse`].
    pub args: String,
    pub path: String,
}

impl CmdArgs {
    /// Reads and validates the variables `cmd` needs.
    pub fn from_env(
        cmd: Command,
        getenv: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<CmdArgs, Error> {
        use Command::*;
        let mut a = CmdArgs {
            args: var(getenv, "CNI_ARGS")?.unwrap_or_default(),
            path: var(getenv, "CNI_PATH")?.unwrap_or_default(),
            ..Default::default()
        };
        if matches!(cmd, Add | Del | Check) {
            a.container_id = required(getenv, "CNI_CONTAINERID")?;
            validate_container_id(&a.container_id)?;
            a.netns = var(getenv, "CNI_NETNS")?.unwrap_or_default();
            if cmd != Del {
                if a.netns.is_empty() {
                    return Err(Error::env("CNI_NETNS", "not set"));
                }
                if !a.netns.starts_with('/') {
                    return Err(Error::env(
                        "CNI_NETNS",
                        format!("{:?} is not an absolute path", a.netns),
                    ));
                }
            }
            a.ifname = required(getenv, "CNI_IFNAME")?;
            validate_ifname(&a.ifname)?;
        }
        Ok(a)
    }
}

fn var(
    getenv: &dyn Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> Result<Option<String>, Error> {
    match getenv(name) {
        None => Ok(None),
        Some(v) => v
            .into_string()
            .map(Some)
            .map_err(|v| Error::env(name, format!("{v:?} is not valid UTF-8"))),
    }
}

fn required(
    getenv: &dyn Fn(&str) -> Option<OsString>,
    name: &'static str,
) -> Result<String, Error> {
    match var(getenv, name)? {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::env(name, "not set")),
    }
}

/// libcni's rule: an alphanumeric, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), Error> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::env(
            "CNI_CONTAINERID",
            format!("{id:?} must start with [A-Za-z0-9] and contain only [A-Za-z0-9_.-]"),
        ))
    }
}

/// libcni's rule, which is the kernel's: at most 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
fn validate_ifname(name: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::env("CNI_IFNAME", format!("{name:?} {why}")));
    if name.len() > 15 {
        return bad("is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("is not a valid interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

/// The `CNI_ARGS` that vswitch understands.
///
/// Follows the CNI conventions: `KEY=VALUE` pairs separated by `;`; a key vswitch does not know
/// is an error unless `IgnoreUnknown` is `1` or `true`, so that a user asking for something
/// vswitch does not do hears about it. Kubernetes runtimes always set IgnoreUnknown. `IP=` and
/// `MAC=` ask for an address and a MAC (host-local's and podman's convention).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_infra_container_id: Option<String>,
    /// `IP=`: the address the runtime asks for (host-local's convention; podman's `--ip`).
    /// A comma-separated list may hold one IPv4 address; the pod network is IPv4 only.
    pub ip: Option<std::net::Ipv4Addr>,
    /// `MAC=`: the MAC address the runtime asks for (podman's `--mac-address`).
    pub mac: Option<String>,
}

/// `IP=` of CNI_ARGS: empty, or a list of addresses of which exactly one is IPv4 (an IPv6
/// one cannot be given, so asking for it is an error rather than silently ignored).
fn requested_ip(v: &str) -> Result<Option<std::net::Ipv4Addr>, Error> {
    let mut v4 = None;
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // An address may come with its prefix length (10.244.1.5/24).
        let addr = item.split_once('/').map_or(item, |(a, _)| a);
        match addr.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) if v4.is_none() => v4 = Some(a),
            Ok(std::net::IpAddr::V4(_)) => {
                return Err(Error::env(
                    "CNI_ARGS",
                    format!("IP={v:?} asks for more than one IPv4 address"),
                ))
            }
            Ok(std::net::IpAddr::V6(_)) => {
                return Err(Error::env(
                    "CNI_ARGS",
                    format!("IP={v:?}: the pod network is IPv4 only"),
                ))
            }
            Err(_) => {
                return Err(Error::env(
                    "CNI_ARGS",
                    format!("IP={v:?}: {item:?} is not an IP address"),
                ))
            }
        }
    }
    Ok(v4)
}

impl CniArgs {
    pub fn parse(s: &str) -> Result<CniArgs, Error> {
        let mut out = CniArgs::default();
        let mut ignore_unknown = false;
        let mut unknown = Vec::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(Error::env(
                    "CNI_ARGS",
                    format!("{pair:?} is not a KEY=VALUE pair"),
                ));
            };
            let value = (!v.is_empty()).then(|| v.to_string());
            match k {
                "K8S_POD_NAMESPACE" => out.pod_namespace = value,
                "K8S_POD_NAME" => out.pod_name = value,
                "K8S_POD_UID" => out.pod_uid = value,
                "IP" => out.ip = requested_ip(v)?,
                "MAC" => out.mac = value,
                "K8S_POD_INFRA_CONTAINER_ID" => out.pod_infra_container_id = value,
                "IgnoreUnknown" => {
                    ignore_unknown = v == "1" || v.eq_ignore_ascii_case("true");
                }
                "" => return Err(Error::env("CNI_ARGS", format!("{pair:?} has an empty key"))),
                _ => unknown.push(k),
            }
        }
        if let (false, Some(k)) = (ignore_unknown, unknown.first()) {
            return Err(Error::env(
                "CNI_ARGS",
                format!("vswitch does not understand {k:?} (set IgnoreUnknown=1 to ignore it)"),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn env_err(cmd: Command, pairs: &[(&str, &str)]) -> (u32, String) {
        let e = CmdArgs::from_env(cmd, &env(pairs)).unwrap_err();
        (e.code(), e.to_string())
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn without(var: &str) -> Vec<(&'static str, &'static str)> {
        FULL.iter().copied().filter(|(k, _)| *k != var).collect()
    }

    fn with(var: &'static str, val: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v = without(var);
        v.push((var, val));
        v
    }

    #[test]
    fn command_parsing() {
        assert_eq!(
            command(&env(&[("CNI_COMMAND", "ADD")])).unwrap(),
            Command::Add
        );
        assert_eq!(
            command(&env(&[("CNI_COMMAND", "GC")])).unwrap(),
            Command::Gc
        );
        let e = command(&env(&[])).unwrap_err();
        assert_eq!(
            (e.code(), e.to_string()),
            (4, "CNI_COMMAND: not set".into())
        );
        let e = command(&env(&[("CNI_COMMAND", "add")])).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e
            .to_string()
            .starts_with("CNI_COMMAND: unknown command \"add\""));
    }

    #[test]
    fn full_env_is_read() {
        let a = CmdArgs::from_env(Command::Add, &env(FULL)).unwrap();
        assert_eq!(a.container_id, "abc123");
        assert_eq!(a.netns, "/run/netns/x");
        assert_eq!(a.ifname, "eth0");
        assert_eq!(a.path, "/opt/cni/bin");
    }

    #[test]
    fn each_missing_or_bad_variable_is_code_4_and_named() {
        for cmd in [Command::Add, Command::Check, Command::Del] {
            for var in ["CNI_CONTAINERID", "CNI_IFNAME"] {
                let (code, msg) = env_err(cmd, &without(var));
                assert_eq!(code, 4);
                assert_eq!(msg, format!("{var}: not set"));
            }
        }
        for cmd in [Command::Add, Command::Check] {
            let (code, msg) = env_err(cmd, &without("CNI_NETNS"));
            assert_eq!((code, msg.as_str()), (4, "CNI_NETNS: not set"));
            let (code, msg) = env_err(cmd, &with("CNI_NETNS", "run/netns/x"));
            assert_eq!(code, 4);
            assert!(msg.starts_with("CNI_NETNS:"), "{msg}");
        }
        for (var, val) in [
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_CONTAINERID", "a b"),
            ("CNI_CONTAINERID", ""),
            ("CNI_IFNAME", "eth0123456789abc"),
            ("CNI_IFNAME", ".."),
            ("CNI_IFNAME", "eth:0"),
            ("CNI_IFNAME", "eth 0"),
            ("CNI_IFNAME", "a/b"),
        ] {
            let (code, msg) = env_err(Command::Add, &with(var, val));
            assert_eq!(code, 4, "{var}={val:?}");
            assert!(msg.starts_with(&format!("{var}:")), "{msg}");
        }
        // 15 bytes is the kernel's limit and fine.
        CmdArgs::from_env(Command::Add, &env(&with("CNI_IFNAME", "eth0123456789ab"))).unwrap();
    }

    #[test]
    fn non_utf8_is_code_4() {
        use std::os::unix::ffi::OsStringExt;
        let getenv = |k: &str| match k {
            "CNI_CONTAINERID" => Some(OsString::from_vec(vec![b'a', 0xff])),
            _ => env(FULL)(k),
        };
        let e = CmdArgs::from_env(Command::Add, &getenv).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.to_string().starts_with("CNI_CONTAINERID:"));
    }

    #[test]
    fn del_tolerates_missing_netns_and_status_gc_need_nothing() {
        let a = CmdArgs::from_env(Command::Del, &env(&without("CNI_NETNS"))).unwrap();
        assert_eq!(a.netns, "");
        let a = CmdArgs::from_env(Command::Del, &env(&with("CNI_NETNS", ""))).unwrap();
        assert_eq!(a.netns, "");
        CmdArgs::from_env(Command::Status, &env(&[])).unwrap();
        CmdArgs::from_env(Command::Gc, &env(&[])).unwrap();
        // CNI_PATH is never required: vswitch calls no other plugin.
        CmdArgs::from_env(Command::Add, &env(&without("CNI_PATH"))).unwrap();
    }

    #[test]
    fn cni_args_kubernetes() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;FOO=bar",
        )
        .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.pod_infra_container_id.as_deref(), Some("abc"));
        assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
        // Order does not matter, trailing separators and empty values are tolerated.
        let a = CniArgs::parse("K8S_POD_NAME=p;K8S_POD_NAMESPACE=;IgnoreUnknown=true;").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("p"));
        assert_eq!(a.pod_namespace, None);
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        // Values may contain '='.
        let a = CniArgs::parse("K8S_POD_NAME=a=b").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("a=b"));
    }

    #[test]
    fn cni_args_ip_and_mac_requests() {
        let a = CniArgs::parse("IgnoreUnknown=1;IP=10.244.1.50;MAC=0a:58:0a:f4:01:32").unwrap();
        assert_eq!(a.ip, Some(std::net::Ipv4Addr::new(10, 244, 1, 50)));
        assert_eq!(a.mac.as_deref(), Some("0a:58:0a:f4:01:32"));
        let a = CniArgs::parse("IP=10.244.1.50/24").unwrap();
        assert_eq!(a.ip, Some(std::net::Ipv4Addr::new(10, 244, 1, 50)));
        assert_eq!(CniArgs::parse("IP=").unwrap().ip, None);
        for bad in [
            "IP=fd00::5",
            "IP=10.244.1.50,fd00::5",
            "IP=10.244.1.50,10.244.1.51",
            "IP=nope",
        ] {
            let e = CniArgs::parse(&format!("IgnoreUnknown=1;{bad}")).unwrap_err();
            assert_eq!(e.code(), 4, "{bad}");
            assert!(e.to_string().contains("IP="), "{e}");
        }
    }

    #[test]
    fn cni_args_errors_are_code_4() {
        for bad in ["K8S_POD_NAME", "=x", "FOO=bar", "FOO=bar;IgnoreUnknown=0"] {
            let e = CniArgs::parse(bad).unwrap_err();
            assert_eq!(e.code(), 4, "{bad}");
            assert!(e.to_string().starts_with("CNI_ARGS:"), "{e}");
        }
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=1").is_ok());
    }
}
