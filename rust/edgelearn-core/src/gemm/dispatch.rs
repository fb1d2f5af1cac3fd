//! Run-time kernel selection: CPU feature detection, a cached choice, and `EDGELEARN_KERNEL` to force one.

use std::sync::RwLock;

use super::scalar::SCALAR;
use super::Kernel;
use crate::error::{Error, Result};

/// Every kernel name edgelearn knows, on any architecture.
pub const KNOWN_KERNELS: &[&str] = &[
    "scalar",
    "avx2",
    "avxvnni",
    "avx512vnni",
    "neon",
    "dotprod",
    "i8mm",
];

/// A kernel an architecture module offers: `make` returns it only if this CPU has `features`.
pub struct Candidate {
    pub name: &'static str,
    /// CPU features the kernel needs (as `is_*_feature_detected!` spells them), for error messages.
    pub features: &'static [&'static str],
    pub make: fn() -> Option<&'static dyn Kernel>,
}

fn scalar() -> Option<&'static dyn Kernel> {
    Some(&SCALAR)
}

/// Candidates for this build's architecture, best first; `scalar` is always last.
fn candidates() -> Vec<Candidate> {
    #[allow(unused_mut)]
    let mut v: Vec<Candidate> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    v.extend(super::x86::candidates());
    #[cfg(target_arch = "aarch64")]
    v.extend(super::aarch64::candidates());
    v.push(Candidate {
        name: "scalar",
        features: &[],
        make: scalar,
    });
    v
}

/// The kernels this CPU can run, best first.
pub fn available_kernels() -> Vec<&'static dyn Kernel> {
    candidates().iter().filter_map(|c| (c.make)()).collect()
}

/// CPU features relevant to the kernels, as detected at run time.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f: Vec<&'static str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => { $( if std::arch::is_x86_feature_detected!($name) { f.push($name); } )* };
        }
        probe!(
            "sse4.1",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($name) { f.push($name); } )* };
        }
        probe!("neon", "dotprod", "i8mm", "sve", "sve2");
    }
    f
}

/// The kernel called `name`; an error if the name is unknown or this CPU/build lacks it.
pub fn kernel_by_name(name: &str) -> Result<&'static dyn Kernel> {
    let name = name.trim().to_ascii_lowercase();
    let cands = candidates();
    match cands.iter().find(|c| c.name == name) {
        Some(c) => (c.make)().ok_or_else(|| Error::KernelUnavailable {
            name: name.clone(),
            msg: format!(
                "this CPU lacks {} (features seen: {})",
                c.features.join("+"),
                cpu_features().join(", ")
            ),
        }),
        None if KNOWN_KERNELS.contains(&name.as_str()) => Err(Error::KernelUnavailable {
            name: name.clone(),
            msg: format!(
                "it is not built for {} (available: {})",
                std::env::consts::ARCH,
                names(&cands)
            ),
        }),
        None => Err(Error::KernelUnavailable {
            name: name.clone(),
            msg: format!("unknown kernel name (known: {})", KNOWN_KERNELS.join(", ")),
        }),
    }
}

fn names(c: &[Candidate]) -> String {
    c.iter()
        .filter(|c| (c.make)().is_some())
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

static ACTIVE: RwLock<Option<&'static dyn Kernel>> = RwLock::new(None);

/// The kernel GEMMs use: the one set by [`set_kernel`], else `EDGELEARN_KERNEL`, else the best available.
/// A bad `EDGELEARN_KERNEL` is an error (never silently ignored).
pub fn active_kernel() -> Result<&'static dyn Kernel> {
    if let Some(k) = *ACTIVE.read().unwrap_or_else(|e| e.into_inner()) {
        return Ok(k);
    }
    let chosen = match std::env::var("EDGELEARN_KERNEL") {
        Ok(v) if !v.trim().is_empty() => kernel_by_name(&v).map_err(|e| match e {
            Error::KernelUnavailable { name, msg } => Error::KernelUnavailable {
                name,
                msg: format!("{msg} [set by EDGELEARN_KERNEL]"),
            },
            other => other,
        })?,
        _ => available_kernels()[0],
    };
    *ACTIVE.write().unwrap_or_else(|e| e.into_inner()) = Some(chosen);
    Ok(chosen)
}

/// Forces the kernel by name, or (`None`) goes back to automatic choice (re-reading `EDGELEARN_KERNEL`).
pub fn set_kernel(name: Option<&str>) -> Result<()> {
    let k = match name {
        Some(n) => Some(kernel_by_name(n)?),
        None => None,
    };
    *ACTIVE.write().unwrap_or_else(|e| e.into_inner()) = k;
    Ok(())
}
