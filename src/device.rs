//! Picking a device. The one place that knows which burn backend serves the CPU.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

/// The CPU device: burn's flex backend (`gemm` matrix products with AVX2 / AVX-512 chosen at run
/// time, threads on every core through rayon; `RAYON_NUM_THREADS` sets how many), computing in
/// f32.
pub fn cpu() -> Device {
    Device::flex()
}

/// Sets the float dtype the device computes and loads weights in: `f32` (the default), `f16` or
/// `bf16`. Must come before the first tensor on the device (a model loaded, a generation run).
/// On the CPU, f16 halves memory and decodes faster than f32 on the 1B shape (BENCHMARKS.md);
/// bf16 is slow there (no native bf16 matrix product).
pub fn configure_dtype(device: &mut Device, dtype: &str) -> crate::Result<()> {
    use burn::tensor::FloatDType;
    let float = match dtype {
        "f32" => FloatDType::F32,
        "f16" => FloatDType::F16,
        "bf16" => FloatDType::BF16,
        other => return Err(crate::Error::Device(format!("unknown dtype {other:?} (expected f32, f16 or bf16)"))),
    };
    if float == FloatDType::F32 && device.settings().float_dtype == FloatDType::F32 {
        return Ok(());
    }
    device.configure(float).map_err(|e| crate::Error::Device(format!("this device cannot compute in {dtype}: {e:?}")))
}

/// Whether `device` is the CPU device of [`cpu`].
pub fn is_cpu(device: &Device) -> bool {
    *device == cpu()
}

/// Runs `work` on a thread of the CPU's compute pool (rayon's global pool, over which burn-flex
/// and [`crate::nn`]'s products split their loops), the pool's other threads kept awake for it,
/// and returns what it returns.
///
/// A parallel loop started from outside the pool hands its work to the pool and puts the caller
/// to sleep until it is done, and a pool thread with nothing to do soon sleeps too; waking a
/// thread costs tens of microseconds (more on a virtual machine), as long as one of a decode
/// step's smaller products takes. A decode step starts a few hundred loops: at the 1B shape on 2
/// cores the products ran at one core's bandwidth. So `work` runs on a pool thread, where a loop
/// shares its work with the thread that starts it, and the other pool threads poll for work
/// until `work` returns instead of sleeping (as llama.cpp's threads spin between operations).
/// Nested calls run in place; so does `work` for a `device` other than the CPU.
pub fn on_compute_pool<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    /// Ends the polling when `work` returns or unwinds.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    if !is_cpu(device) {
        return work();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        let owner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            scope.spawn(move |_| poll_for_work(done, owner));
        }
        let _done = Done(&done);
        work()
    })
}

/// Runs the pool's pending jobs on this thread until `done`. Returns at once on `owner` (the thread
/// that runs the work: it would wait on itself) and on a thread that is polling already.
fn poll_for_work(done: &AtomicBool, owner: Option<usize>) {
    use std::cell::Cell;
    thread_local! {
        static POLLING: Cell<bool> = const { Cell::new(false) };
    }
    if rayon::current_thread_index() == owner || POLLING.get() {
        return;
    }
    POLLING.set(true);
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
    POLLING.set(false);
}

/// A device by name: `cpu`; `cuda` or `cuda:N` (with the `cuda` feature); `wgpu` (any Vulkan,
/// Metal or DX12 GPU, shaders in WGSL; with the `wgpu` feature).
pub fn from_name(name: &str) -> crate::Result<Device> {
    match name {
        "cpu" => Ok(cpu()),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => cuda_device(cuda),
        "wgpu" => wgpu_device(),
        other => Err(crate::Error::Device(format!("unknown device {other:?} (expected cpu, cuda, cuda:N or wgpu)"))),
    }
}

/// The environment variable that moves the GPU kernel cache, or turns it off (`off`).
pub const KERNEL_CACHE_VAR: &str = "VLM_KERNEL_CACHE";

/// Where CubeCL keeps what it learns about kernels between runs (autotune results: which kernel
/// is fastest for each shape): `$VLM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/vlm/kernels`, else
/// `~/.cache/vlm/kernels`. `None` when `VLM_KERNEL_CACHE=off`.
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os(KERNEL_CACHE_VAR) {
        Some(value) if value == "off" || value == "0" => None,
        Some(value) if !value.is_empty() => Some(value.into()),
        _ => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .filter(|dir| !dir.is_empty())
                .map(std::path::PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            Some(cache.join("vlm").join("kernels"))
        }
    }
}

/// Points CubeCL's persistent cache at [`kernel_cache_dir`] (or turns it off), before the first
/// GPU device starts. What the process already configured (a `cubecl.toml`, `CUBECL_*` variables
/// read first) otherwise stands; a configuration set earlier by the application wins entirely.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn configure_kernel_cache() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        match kernel_cache_dir() {
            Some(dir) => config.environment.path = CacheConfig::Directory(dir),
            None => config.autotune.disable_cache = true,
        }
        CubeClRuntimeConfig::try_set(config);
    });
}

/// The default adapter of burn's wgpu runtime, initialised once per process (a runtime cannot be
/// initialised twice): WGSL shaders on whichever graphics API the machine offers.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> crate::Result<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        configure_kernel_cache();
        Device::wgpu_options().init().map_err(|e| e.to_string())
    });
    device.clone().map_err(|reason| {
        crate::Error::Device(format!(
            "no GPU adapter for wgpu: {reason}. Install a Vulkan driver (on Debian or Ubuntu: \
             mesa-vulkan-drivers and libvulkan1; `vulkaninfo --summary` lists what the machine has), \
             or use --device cpu"
        ))
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> crate::Result<Device> {
    Err(crate::Error::Device("this build has no wgpu support; rebuild with `--features wgpu`".into()))
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str) -> crate::Result<Device> {
    let index = match name.strip_prefix("cuda:") {
        Some(index) => {
            index.parse::<usize>().map_err(|_| crate::Error::Device(format!("bad CUDA index in {name:?}")))?
        }
        None => 0,
    };
    check_cuda_runtime(index)?;
    configure_kernel_cache();
    Ok(Device::cuda(index))
}

/// What the CUDA backend needs at run time, checked up front: burn, cubecl and cudarc would panic
/// at the first kernel instead.
#[cfg(feature = "cuda")]
fn check_cuda_runtime(index: usize) -> crate::Result<()> {
    use crate::Error::Device as error;
    // SAFETY: these only try to dlopen the libraries by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(error(
            "the CUDA driver library (libcuda.so) is not on the loader path: install the NVIDIA driver, \
             or add its folder to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(error(
            "NVRTC (libnvrtc.so) is not on the loader path: add the CUDA toolkit's lib64 folder (or the \
             nvidia-cuda-nvrtc wheel's lib folder) to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let include = cubecl::cuda::install::cuda_path().map(|path| path.join("include"));
    if !include.as_ref().is_some_and(|include| include.join("cuda.h").is_file()) {
        let looked = include.map_or("/usr/local/cuda/include, /opt/cuda/include".into(), |p| p.display().to_string());
        return Err(error(format!(
            "CUDA headers not found (looked for cuda.h in {looked}): kernels are compiled at run time and need \
             them; set CUDA_PATH to the CUDA installation (CUDA_HOME is not read)"
        )));
    }
    cudarc::driver::result::init().map_err(|e| error(format!("cannot initialise CUDA: {e}")))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| error(format!("cannot count GPUs: {e}")))?;
    if index >= count as usize {
        return Err(error(format!("no CUDA device {index}: this machine has {count}")));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_name: &str) -> crate::Result<Device> {
    Err(crate::Error::Device("this build has no CUDA support; rebuild with `--features cuda`".into()))
}

/// Kernels launched on the CubeCL devices (wgpu, CUDA) while a [`LaunchCounter`] was counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLaunches {
    /// Launches issued, autotune measurements included.
    pub launches: usize,
    /// Launches per kernel name (as the kernel names itself), most launched first.
    pub by_name: Vec<(String, usize)>,
    /// Distinct kernels among them. In a fresh process each one is compiled on its first launch
    /// (or loaded from the persisted cache, where the runtime keeps compiled kernels), so over a
    /// process's first request this is its kernel compilations.
    pub distinct: usize,
}

/// Counts kernel launches on every CubeCL device of the process, from [`start`](Self::start) to
/// [`finish`](Self::finish): how many kernels a decode step costs, how many a first request
/// compiles. CubeCL's launch observer is process-wide: one counter at a time, and launches from
/// other threads count too. The CPU device launches no kernels.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub struct LaunchCounter {
    count: std::sync::Arc<LaunchCount>,
    observation: cubecl_runtime::logging::LaunchObservation,
    distinct: cubecl_runtime::launched::LaunchedKernels,
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[derive(Default)]
struct LaunchCount(std::sync::Mutex<std::collections::HashMap<&'static str, usize>>);

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl cubecl_runtime::logging::LaunchObserver for LaunchCount {
    fn launched(&self, kernel: &'static str) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(kernel).or_default() += 1;
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl LaunchCounter {
    /// Starts counting. Work queued before (burn's fusion keeps operations until it must run them)
    /// is counted when it launches: sync the device first (read a result back) to leave it out.
    pub fn start() -> Self {
        let count = std::sync::Arc::new(LaunchCount::default());
        let observation = cubecl_runtime::logging::LaunchObservation::new(count.clone());
        Self { count, observation, distinct: cubecl_runtime::launched::LaunchedKernels::new() }
    }

    /// Stops counting; sync the device before (read a result back) so that queued work is launched.
    pub fn finish(self) -> KernelLaunches {
        use cubecl_runtime::config::{TypeNameFormatLevel, type_name_format};
        let Self { count, observation, distinct } = self;
        drop(observation);
        let counts = std::mem::take(&mut *count.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut by_name: Vec<(String, usize)> = counts
            .into_iter()
            .map(|(name, count)| (type_name_format(name, TypeNameFormatLevel::Balanced), count))
            .collect();
        by_name.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let launches = by_name.iter().map(|(_, count)| count).sum();
        KernelLaunches { launches, by_name, distinct: distinct.finish().len() }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::{cpu, on_compute_pool};

    #[test]
    fn work_runs_on_a_pool_thread_and_its_loops_finish() {
        let (on_pool, sum) = on_compute_pool(&cpu(), || {
            let inner = on_compute_pool(&cpu(), || (0..10_000u64).into_par_iter().sum::<u64>());
            (rayon::current_thread_index().is_some(), inner)
        });
        assert!(on_pool);
        assert_eq!(sum, 49_995_000);
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller_and_the_pool_keeps_working() {
        let result = std::panic::catch_unwind(|| on_compute_pool(&cpu(), || panic!("inside the pool")));
        assert!(result.is_err());
        assert_eq!(on_compute_pool(&cpu(), || (1..=100u32).into_par_iter().sum::<u32>()), 5050);
    }
}
