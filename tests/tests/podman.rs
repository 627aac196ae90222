//! A real CNI runtime: podman with its CNI network backend runs containers on a vswitch
//! network. Two containers of one podman pod talk over localhost (they share the pod's
//! network namespace, which the infra container holds and our plugin attached), a second pod
//! reaches the first pod's address through the switch, and removing the pods gives every
//! address back (podman's CNI DEL).
//!
//! Everything podman keeps is isolated in a temporary directory: its own containers.conf
//! (CONTAINERS_CONF), storage (--root, --runroot, vfs driver), state (--tmpdir) and CNI config
//! dir holding just our network. There is no registry here, so the image is a busybox rootfs
//! made on the spot and `podman import`ed, and it also serves as the pods' infra image.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vswitch_tests::*;

const PODMAN_TIMEOUT: Duration = Duration::from_secs(90);
const PAGE: &str = "hello from container A\n";

/// An isolated podman set-up with one CNI network on a vswitchd. Dropping it removes the
/// pods, containers and image it made, then its whole directory.
struct Podman {
    dir: TempDir,
    network: String,
    image: String,
}

impl Podman {
    fn new(socket: &Path) -> Podman {
        assert!(
            have("podman") && have("runc"),
            "podman and runc are needed (tests/run.sh installs them)"
        );
        let name = unique("vstp");
        let dir = TempDir::new(&name);
        let p = Podman {
            network: name.clone(),
            image: format!("localhost/{name}:latest"),
            dir,
        };
        let cnibin = p.dir.join("cni-bin");
        let netd = p.dir.join("cni-net.d");
        for d in [&cnibin, &netd] {
            fs::create_dir_all(d).unwrap();
        }
        symlink(bin("vswitch"), cnibin.join("vswitch")).unwrap();
        fs::write(
            netd.join(format!("{name}.conflist")),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": name,
                "plugins": [{"type": "vswitch", "socket": socket,
                             "capabilities": {"portMappings": true}}],
            })
            .to_string(),
        )
        .unwrap();
        // As ENVIRONMENT.md describes for this machine: runc (crun fails on this cgroup
        // layout), cgroupfs, no default ulimits.
        fs::write(
            p.dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{:?}, \"/usr/lib/cni\"]\n\
                 network_config_dir = {:?}\n\n[containers]\ndefault_ulimits = []\n\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
                cnibin.display().to_string(),
                netd.display().to_string()
            ),
        )
        .unwrap();
        p.import_image();
        p
    }

    /// A busybox rootfs with its applets, a page to serve and an infra process.
    fn import_image(&self) {
        let root = self.dir.join("rootfs");
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "www"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "/bin/busybox is missing (package busybox-static)"
        );
        fs::copy(busybox, root.join("bin/busybox")).unwrap();
        let applets = run(Command::new(busybox).arg("--list"), SHORT).ok();
        for a in applets
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox")
        {
            symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        // The infra container's process: holds the pod's namespaces, exits on SIGTERM.
        fs::write(
            root.join("bin/pause"),
            "#!/bin/sh\ntrap 'exit 0' TERM INT\nwhile :; do sleep 1 & wait $!; done\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root.join("bin/pause"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("www/index.html"), PAGE).unwrap();
        let tar = self.dir.join("rootfs.tar");
        run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            SHORT,
        )
        .ok();
        self.ok(&["import", &tar.display().to_string(), &self.image]);
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--runtime",
                "runc",
                "--events-backend",
                "file",
            ])
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Out {
        run(&mut self.command(args), PODMAN_TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.success(), "podman failed:\n{out}");
        out.stdout
    }

    /// A pod on our network whose infra container runs our image.
    fn pod_create(&self, pod: &str) {
        self.pod_create_with(pod, &[]);
    }

    /// A pod as [`Podman::pod_create`] makes it, with more `podman pod create` options.
    fn pod_create_with(&self, pod: &str, more: &[&str]) {
        let mut args = vec![
            "pod",
            "create",
            "--name",
            pod,
            "--network",
            &self.network,
            "--infra-image",
            &self.image,
            "--infra-command",
            "/bin/pause",
        ];
        args.extend_from_slice(more);
        self.ok(&args);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = try_run(&mut self.command(args), &[], PODMAN_TIMEOUT);
        };
        // Removing the pods stops their infra containers, which is when podman runs CNI DEL.
        quiet(&["pod", "rm", "--all", "--force", "--time", "0"]);
        quiet(&["rm", "--all", "--force", "--time", "0"]);
        quiet(&["rmi", "--all", "--force"]);
        // Anything podman still has mounted under the directory (a container's /dev/shm)
        // must go before the directory can.
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.path().display().to_string();
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = try_run(Command::new("umount").args(["-l", m]), &[], SHORT);
            }
        }
    }
}

/// Runs a one-off container, retrying while its server may still be starting.
fn fetch(podman: &Podman, args: &[&str]) -> Out {
    let mut last = None;
    for _ in 0..10 {
        let out = podman.run(args);
        if out.success() {
            return out;
        }
        last = Some(out);
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{}", last.map(|o| o.to_string()).unwrap_or_default());
}

#[test]
fn podman_pods_talk_over_localhost_and_across_the_switch() {
    let daemon = Daemon::start("10.250.8.0/24");
    let podman = Podman::new(&daemon.socket);
    let image = podman.image.clone();
    let (pod_a, pod_b) = (
        format!("{}-a", podman.network),
        format!("{}-b", podman.network),
    );

    // Pod A: container A serves a page on port 8080, published as hostPort 18080 (podman
    // passes it to the plugin as runtimeConfig.portMappings: the conflist declares the
    // capability).
    podman.pod_create_with(&pod_a, &["-p", "18080:8080"]);
    podman.ok(&[
        "run",
        "-d",
        "--pod",
        &pod_a,
        "--name",
        &format!("{pod_a}-web"),
        &image,
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let ports_a = ports(&daemon.socket).ports;
    assert_eq!(
        ports_a.len(),
        1,
        "pod A (its infra container) should be one port on the switch: {ports_a:?}"
    );
    let ip_a: IpAddr = ports_a[0].ip;
    assert_eq!(
        ports_a[0]
            .host_ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["18080->8080/tcp"],
        "pod A's hostPort on the switch: {ports_a:?}"
    );

    // Container B in the same pod fetches it over localhost: the pod's shared namespace.
    // (busybox's own `wget -T` crashes in this build, so `timeout` bounds it instead.)
    let local = fetch(
        &podman,
        &[
            "run",
            "--rm",
            "--pod",
            &pod_a,
            &image,
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/",
        ],
    );
    assert_eq!(
        local.stdout, PAGE,
        "container B got the wrong page: {local}"
    );
    // B sees the address the switch gave the pod.
    let addr = podman.ok(&[
        "run", "--rm", "--pod", &pod_a, &image, "ip", "-o", "-4", "addr", "show", "eth0",
    ]);
    assert!(
        addr.contains(&format!("{ip_a}/24")),
        "eth0 in pod A: {addr}"
    );

    // Pod B reaches pod A's address through the switch.
    podman.pod_create(&pod_b);
    let remote = fetch(
        &podman,
        &[
            "run",
            "--rm",
            "--pod",
            &pod_b,
            &image,
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip_a}:8080/"),
        ],
    );
    assert_eq!(remote.stdout, PAGE, "pod B got the wrong page: {remote}");
    let both = ports(&daemon.socket).ports;
    assert_eq!(both.len(), 2, "two pods, two ports: {both:?}");
    assert_ne!(both[0].ip, both[1].ip, "two pods, one address: {both:?}");

    // A plain container on the network pings pod A.
    let ping = podman.run(&[
        "run",
        "--rm",
        "--network",
        &podman.network,
        "--cap-add",
        "NET_RAW",
        &image,
        "ping",
        "-c",
        "3",
        "-W",
        "2",
        &ip_a.to_string(),
    ]);
    assert!(
        ping.success() && ping.stdout.contains("3 packets received"),
        "ping from a container to pod A:\n{ping}"
    );
    // `--rm` removed it, and with it its port.
    assert_eq!(ports(&daemon.socket).ports.len(), 2);

    // The hostPort reaches pod A from the node vswitchd runs on (its namespace here).
    let mut last = None;
    for _ in 0..10 {
        let o = exec_in(
            daemon.netns.name(),
            &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:18080/"],
            Duration::from_secs(10),
        );
        if o.success() {
            last = None;
            assert_eq!(o.stdout, PAGE, "hostPort 18080: {o}");
            break;
        }
        last = Some(o);
        std::thread::sleep(Duration::from_millis(300));
    }
    if let Some(o) = last {
        panic!("hostPort 18080 on the node did not reach pod A:\n{o}");
    }

    podman.ok(&["pod", "rm", "--force", "--time", "0", &pod_a, &pod_b]);
    let o = exec_in(
        daemon.netns.name(),
        &["curl", "-sS", "--max-time", "3", "http://127.0.0.1:18080/"],
        Duration::from_secs(8),
    );
    assert_eq!(o.status.code(), Some(7), "hostPort 18080 after pod rm: {o}");
    let left = ports(&daemon.socket).ports;
    assert!(left.is_empty(), "ports left after podman pod rm: {left:?}");
    assert!(leases(&daemon.state_dir).is_empty());
    assert_daemon_holds_no_pod(daemon.pid(), daemon.netns.name());
}
