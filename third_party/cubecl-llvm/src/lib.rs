//! A stand-in for `cubecl-llvm` 0.11.3 that builds without downloading LLVM.
//!
//! `cubecl-cuda` always depends on `cubecl-llvm`, whose build script downloads an LLVM bundle.
//! `vlm` selects cubecl's C++/NVRTC code path (`cuda-cpp`), which never calls into LLVM, so this
//! crate provides only the items `cubecl-cuda` names. Its compiler refuses every kernel with a
//! clear error. Wired in with `[patch.crates-io]` in the workspace root.

use cubecl_core::ir::amd::GfxArch;
use cubecl_core::prelude::KernelDefinition;
use cubecl_core::Compiler;
use cubecl_environment::backtrace::BackTrace;
use cubecl_runtime::compiler::CompilationError;
use cubecl_runtime::kernel::BufferIOAttr;

pub mod target {
    /// Code-generation targets of the real crate.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub enum LlvmTarget {
        /// Host CPU.
        #[default]
        Cpu,
        /// NVIDIA PTX.
        Nvptx,
    }
}

pub use target::LlvmTarget;

pub mod nvptx {
    pub mod ptx_version {
        /// A PTX ISA version, `ptx{major}{minor}`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct PtxVersion(u32);

        /// First CUDA driver version (as `cuDriverGetVersion` reports it) of each PTX ISA version,
        /// newest first (NVIDIA's PTX ISA release notes).
        const DRIVER_PTX: &[(i32, u32)] = &[
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12070, 86),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11070, 77),
            (11060, 76),
            (11050, 75),
            (11040, 74),
            (11030, 73),
            (11020, 72),
            (11010, 71),
            (11000, 70),
            (10020, 65),
            (10010, 64),
            (10000, 63),
        ];

        impl PtxVersion {
            /// The newest PTX version a driver of the given CUDA version loads; `None` before 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                DRIVER_PTX.iter().find(|(first, _)| driver >= *first).map(|(_, ptx)| Self(*ptx))
            }
        }

        impl core::fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }
    }
}

pub mod shared {
    pub mod lowered_features {
        use cubecl_core::ir::DeviceProperties;

        /// GPU targets of the LLVM path.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            /// NVIDIA PTX.
            Nvptx,
        }

        /// The real crate narrows device features to what its LLVM lowering supports; without
        /// that lowering there is nothing to narrow (and this is only called on the LLVM path).
        pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {}
    }
}

/// A compiled PTX module.
#[derive(Clone, Debug, Default)]
pub struct NvptxModule {
    /// NUL-terminated PTX assembly.
    pub ptx: Vec<core::ffi::c_char>,
    /// Kernel entry point symbol.
    pub entrypoint: String,
    /// IR for logging and cache keys.
    pub ir: String,
    /// Shared memory per launch, in bytes.
    pub shared_memory_size: usize,
    /// Buffer access modes in binding order.
    pub io: Vec<BufferIOAttr>,
}

/// What the LLVM compiler produces.
#[derive(Debug)]
pub enum PlironArtifact {
    /// A PTX module.
    NvptxCode(NvptxModule),
}

impl core::fmt::Display for PlironArtifact {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlironArtifact::NvptxCode(module) => f.write_str(&module.ir),
        }
    }
}

/// Options of the LLVM compiler.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// AMDGPU architecture.
    pub arch: Option<GfxArch>,
    /// NVPTX architecture.
    pub sm_arch: Option<cubecl_core::ir::nvidia::SmArch>,
    /// PTX version to emit.
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    /// Whether kernel parameters are passed as grid constants.
    pub grid_constants: bool,
}

/// The LLVM compiler, absent from this build.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    /// Target to compile for.
    pub target: LlvmTarget,
}

impl Compiler for PlironCompiler {
    type Representation = PlironArtifact;
    type CompilationOptions = PlironOptions;

    fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &Self::CompilationOptions,
    ) -> Result<Self::Representation, CompilationError> {
        Err(CompilationError::Generic {
            reason: "this build has no LLVM backend (cubecl-llvm stand-in); kernels compile through \
                     NVRTC with cubecl's cuda-cpp feature"
                .into(),
            backtrace: BackTrace::capture(),
        })
    }

    fn extension(&self) -> &'static str {
        "ll"
    }

    fn lang_tag(&self) -> &'static str {
        "llvm"
    }
}
