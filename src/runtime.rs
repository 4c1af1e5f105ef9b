//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time, and the
//! library comes from the pinned PyPI wheel `onnxruntime==1.31.1` that `make setup`
//! installs into `.venv`. ONNX Runtime allows one environment per process, so it is
//! created once here and shared by every session.
//!
//! Owns: locating the library and the process-wide environment (one intra-op thread
//! pool). Must not import anything of the request path.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::{Environment, GlobalThreadPoolOptions};

use crate::config::RuntimeConfig;

/// The wheel's file name; it ships no unversioned `libonnxruntime.so` symlink.
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: set ORT_DYLIB_PATH to {ORT_LIBRARY_FILE} or run `make setup` \
         (installs onnxruntime==1.31.1 into .venv); looked in: {}",
        .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound(Vec<PathBuf>),
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(String),
}

/// Where the library is looked for, in order: the config, `ORT_DYLIB_PATH`, then the
/// `.venv` of the current directory and of the folders above the executable (so
/// `target/release/pandaguard` finds the project's `.venv` from anywhere).
pub fn locate_library(config: &RuntimeConfig) -> Result<PathBuf, RuntimeError> {
    if let Some(path) = &config.ort_dylib_path {
        return existing(path).ok_or_else(|| RuntimeError::NotFound(vec![path.clone()]));
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return existing(&path).ok_or_else(|| RuntimeError::NotFound(vec![path]));
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    let mut looked = Vec::new();
    for root in roots {
        let lib_dir = root.join(".venv").join("lib");
        looked.push(lib_dir.clone());
        if let Some(found) = find_in_venv_lib(&lib_dir) {
            return Ok(found);
        }
    }
    Err(RuntimeError::NotFound(looked))
}

fn existing(path: &Path) -> Option<PathBuf> {
    path.is_file().then(|| path.to_path_buf())
}

/// `.venv/lib/python3.X/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1`
fn find_in_venv_lib(lib_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(lib_dir).ok()?;
    entries.flatten().find_map(|entry| {
        let candidate = entry.path().join("site-packages/onnxruntime/capi").join(ORT_LIBRARY_FILE);
        existing(&candidate)
    })
}

/// The process-wide environment, created on first use with a global intra-op thread
/// pool that all sessions share (several models on few cores must not each spawn a
/// full pool and oversubscribe the CPU).
pub fn environment(config: &RuntimeConfig) -> Result<&'static Environment, RuntimeError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    set_malloc_mmap_threshold(config.malloc_mmap_threshold);
    let path = locate_library(config)?;
    let builder =
        ort::init_from(&path).map_err(|e| RuntimeError::Load { path: path.clone(), message: e.to_string() })?;
    let threads = intra_op_threads(config);
    let pool = GlobalThreadPoolOptions::default()
        .with_intra_threads(threads)
        .and_then(|p| p.with_inter_threads(config.inter_op_threads.max(1)))
        .and_then(|p| p.with_spin_control(config.spin))
        .map_err(|e| RuntimeError::Environment(e.to_string()))?;
    let env = builder
        .with_name("pandaguard")
        .with_telemetry(false)
        .with_global_thread_pool(pool)
        .build()
        .map_err(|e| RuntimeError::Environment(e.to_string()))?;
    if config.cpu_arena && config.shared_arena {
        register_shared_arena(&env)?;
    }
    tracing::info!(
        library = %path.display(),
        intra_op_threads = threads,
        spin = config.spin,
        cpu_arena = config.cpu_arena,
        shared_arena = config.cpu_arena && config.shared_arena,
        "ONNX Runtime loaded"
    );
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// Asks glibc to give every allocation of at least `bytes` a mapping of its own, which
/// goes back to the system when freed (0: leave glibc's default). By default glibc raises
/// this threshold to the largest block freed so far (up to 32 MiB); after the first run,
/// a run's activation buffers (1–80 MB each) then come from heaps that stay at their
/// peak size. With `runtime.cpu_arena = false` and 256 KiB here, the resident memory
/// falls back to about the models' weights after each run (docs/benchmarks.md "Memory").
/// Called once, before ONNX Runtime starts its threads.
fn set_malloc_mmap_threshold(bytes: usize) {
    if bytes == 0 {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let value = i32::try_from(bytes).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes a tuning parameter of the allocator; it returns 0
        // when the value is refused, and then glibc's default stays.
        let accepted = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) };
        if accepted == 0 {
            tracing::warn!(bytes, "glibc refused runtime.malloc_mmap_threshold; its default stays");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    tracing::info!(bytes, "runtime.malloc_mmap_threshold applies to glibc only; ignored here");
}

/// Registers one CPU arena allocator on the environment for every session to use
/// (sessions opt in with `session.use_env_allocators`). Each session would otherwise
/// keep an arena of its own, sized by the largest batch it ever ran: three models'
/// worth of activations resident at once, although the run gate lets only one model
/// run at a time. Shared, the arena holds what the largest single run needs. It grows
/// by what is requested (`arena_extend_strategy` 1, kSameAsRequested) rather than in
/// powers of two. The `ort` crate has no wrapper for this part of the C API.
fn register_shared_arena(env: &Environment) -> Result<(), RuntimeError> {
    use ort::AsPointer;
    use ort::sys::{OrtAllocatorType, OrtArenaCfg, OrtMemType, OrtMemoryInfo, OrtStatusPtr};

    let api = ort::api();
    let check = |status: OrtStatusPtr| -> Result<(), RuntimeError> {
        if status.0.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null status from the C API holds a NUL-terminated message and
        // is released exactly once here.
        let message = unsafe {
            let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
            (api.ReleaseStatus)(status.0);
            text
        };
        Err(RuntimeError::Environment(format!("cannot register the shared CPU arena: {message}")))
    };
    let mut info: *mut OrtMemoryInfo = std::ptr::null_mut();
    let mut arena: *mut OrtArenaCfg = std::ptr::null_mut();
    let keys = [c"arena_extend_strategy".as_ptr()];
    let values = [1usize];
    // SAFETY: the out-pointers are valid for writes, the key and value arrays hold one
    // entry each as `num_keys` says, `env` outlives the call (the environment is
    // process-wide), and both created objects are released after registering (the
    // environment keeps its own copies).
    unsafe {
        check((api.CreateCpuMemoryInfo)(
            OrtAllocatorType::OrtArenaAllocator,
            OrtMemType::OrtMemTypeDefault,
            &mut info,
        ))?;
        let created = check((api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut arena));
        let registered =
            created.and_then(|()| check((api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info, arena)));
        if !arena.is_null() {
            (api.ReleaseArenaCfg)(arena);
        }
        (api.ReleaseMemoryInfo)(info);
        registered
    }
}

pub fn intra_op_threads(config: &RuntimeConfig) -> usize {
    if config.intra_op_threads > 0 {
        config.intra_op_threads
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_path_that_does_not_exist_is_reported_with_the_fix() {
        let config = RuntimeConfig { ort_dylib_path: Some("/nonexistent/libort.so".into()), ..Default::default() };
        let message = locate_library(&config).unwrap_err().to_string();
        assert!(message.contains("ORT_DYLIB_PATH") && message.contains("make setup"), "{message}");
        assert!(message.contains("/nonexistent/libort.so"), "{message}");
    }
}
