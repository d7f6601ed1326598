//! Podman with its storage and configuration in `target/deploy/podman` (never the
//! host's), the Debian base image made locally (no registry is reachable), and the
//! images of `deploy/docker` built on it.
//!
//! What podman 4.3 needs on these machines, and why each setting is there:
//! - runtime `runc`: crun refuses the hybrid cgroup v1/v2 setup;
//! - `default_ulimits` no higher than the limits podman itself runs with: root here
//!   lacks CAP_SYS_RESOURCE, so runc cannot raise RLIMIT_NOFILE or RLIMIT_NPROC
//!   (podman's defaults are 1048576), and podman starts the runtime with
//!   RLIMIT_NPROC 32768 (seen);
//! - `cgroupfs` and a file for events: no systemd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

/// The images `deploy/docker` defines: (name, Containerfile).
pub const IMAGES: &[(&str, &str)] = &[
    ("ztna-intermediate", "Containerfile.intermediate"),
    ("ztna-connector", "Containerfile.connector"),
    ("ztna-agent", "Containerfile.agent"),
];

/// The binaries the images take from `target/<profile>`.
const BINARIES: &[&str] = &["ztna-intermediate", "ztna-connector", "ztna-agent", "ztna"];

/// Bump when the mmdebstrap options below change: the cached base is keyed by the
/// Containerfiles' base line and this.
const BASE_RECIPE_REVISION: u32 = 1;

/// mmdebstrap options besides suite and variant: a tarball, no documentation (but
/// the copyright files), no manual pages, no translations.
const MMDEBSTRAP_OPTIONS: &[&str] = &[
    "--mode=root",
    "--format=tar",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

/// The label on the imported base image that names the tarball it came from.
const BASE_LABEL: &str = "org.ztna.base-recipe";

/// A podman whose storage and configuration live in one directory.
pub struct Podman {
    pub dir: PathBuf,
}

fn rlimit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    unsafe { libc::getrlimit(resource, &mut lim) };
    lim.rlim_max
}

impl Podman {
    /// Writes the configuration under `root/target/deploy/podman`.
    pub fn setup(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("target/deploy/podman");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let nofile = rlimit(libc::RLIMIT_NOFILE);
        let nproc = rlimit(libc::RLIMIT_NPROC).min(32768);
        let d = dir.display();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\n\
                 default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
                 default_sysctls = []\n\
                 log_driver = \"k8s-file\"\n\
                 [engine]\n\
                 runtime = \"runc\"\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\n\
                 tmp_dir = \"{d}/tmp\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/storage\"\nrunroot = \"{d}/run\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )?;
        Ok(Podman { dir })
    }

    /// The environment that points podman at this configuration (also handed to the
    /// kube-play test).
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("CONTAINERS_CONF", self.dir.join("containers.conf")),
            ("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf")),
            (
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            ),
        ]
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.envs(self.env());
        c
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("running podman")?;
        if !out.status.success() {
            bail!(
                "podman {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The base image every Containerfile names on its `ARG BASE=` line; they must
/// agree. Returns (image, suite, variant), e.g. localhost/ztna-base:bookworm-minbase.
pub fn base_of_containerfiles(root: &Path) -> anyhow::Result<(String, String, String)> {
    let mut base: Option<String> = None;
    for (_, file) in IMAGES {
        let path = root.join("deploy/docker").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("ARG BASE="))
            .with_context(|| format!("{}: no `ARG BASE=` line", path.display()))?
            .trim()
            .to_string();
        match &base {
            Some(b) if *b != line => bail!("{file} has base {line}, another Containerfile {b}"),
            _ => base = Some(line),
        }
    }
    let image = base.context("no Containerfiles")?;
    let tag = image
        .rsplit_once(':')
        .map(|(_, t)| t)
        .with_context(|| format!("base {image}: no tag"))?;
    let (suite, variant) = tag
        .split_once('-')
        .with_context(|| format!("base tag {tag}: expected SUITE-VARIANT"))?;
    Ok((image.clone(), suite.to_string(), variant.to_string()))
}

/// Makes the base image if this storage lacks it: the rootfs tarball from
/// mmdebstrap (cached in `target/deploy/cache`, keyed by the base line), then
/// `podman import`. Returns what it did, for the report.
pub fn ensure_base(podman: &Podman, root: &Path) -> anyhow::Result<String> {
    let (image, suite, variant) = base_of_containerfiles(root)?;
    let key = format!("{suite}-{variant}-r{BASE_RECIPE_REVISION}");
    let cache = root.join("target/deploy/cache");
    std::fs::create_dir_all(&cache)?;
    let tarball = cache.join(format!("rootfs-{key}.tar"));
    let labelled = podman
        .run(&[
            "image",
            "inspect",
            "--format",
            &format!("{{{{index .Labels \"{BASE_LABEL}\"}}}}"),
            &image,
        ])
        .map(|l| l.trim() == key)
        .unwrap_or(false);
    if labelled {
        return Ok(format!("{image} cached"));
    }
    let mut did = Vec::new();
    if !tarball.exists() {
        let started = Instant::now();
        let partial = tarball.with_extension("tar.partial");
        let out = Command::new("mmdebstrap")
            .arg(format!("--variant={variant}"))
            .args(MMDEBSTRAP_OPTIONS)
            .arg(&suite)
            .arg(&partial)
            .output()
            .context("running mmdebstrap")?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "mmdebstrap {suite}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&partial, &tarball)?;
        did.push(format!(
            "mmdebstrap {suite} {variant} in {:.0} s",
            started.elapsed().as_secs_f64()
        ));
    }
    let started = Instant::now();
    podman.run(&[
        "import",
        "--change",
        &format!("LABEL {BASE_LABEL}={key}"),
        "--change",
        "CMD [\"/bin/bash\"]",
        &tarball.display().to_string(),
        &image,
    ])?;
    did.push(format!(
        "podman import in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(format!("{image}: {}", did.join(", ")))
}

/// The build context: the binaries of `profile` (debug info stripped: the images
/// carry no source to read it against) and the XDP object.
fn stage_context(root: &Path, profile: &str) -> anyhow::Result<PathBuf> {
    let ctx = root.join("target/deploy/context");
    std::fs::create_dir_all(ctx.join("bin"))?;
    for b in BINARIES {
        let from = root.join("target").join(profile).join(b);
        let to = ctx.join("bin").join(b);
        let out = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&from)
            .arg(&to)
            .output()
            .context("running objcopy")?;
        if !out.status.success() {
            bail!(
                "objcopy --strip-debug {}: {}",
                from.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let object = root.join("target/ztna-ebpf.o");
    std::fs::copy(&object, ctx.join("ztna-ebpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(ctx)
}

/// Builds every image of `deploy/docker` as `localhost/NAME:latest` from the
/// binaries of `profile` (which the caller built) without pulling anything.
pub fn build_images(podman: &Podman, root: &Path, profile: &str) -> anyhow::Result<()> {
    let ctx = stage_context(root, profile)?;
    for (name, file) in IMAGES {
        let containerfile = root.join("deploy/docker").join(file);
        let out = podman
            .command()
            .args(["build", "--pull=never", "--network=host", "--layers", "-f"])
            .arg(&containerfile)
            .args(["-t", &format!("localhost/{name}:latest")])
            .arg(&ctx)
            .output()
            .context("running podman build")?;
        if !out.status.success() {
            bail!(
                "podman build {file}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    // Intermediate layers of earlier builds that no tag reaches any more.
    let _ = podman.run(&["image", "prune", "-f"]);
    Ok(())
}

/// Writes each image as a docker-archive to `out` (for `podman load`, `kind load
/// image-archive` or `skopeo copy` to a registry).
pub fn save_images(podman: &Podman, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut files = Vec::new();
    for (name, _) in IMAGES {
        let file = out.join(format!("{name}.tar"));
        let _ = std::fs::remove_file(&file);
        podman.run(&[
            "save",
            "--format",
            "docker-archive",
            "-o",
            &file.display().to_string(),
            &format!("localhost/{name}:latest"),
        ])?;
        files.push(file);
    }
    Ok(files)
}
