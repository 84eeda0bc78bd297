//! The argument structs of the kernel files, one module per file: the ABI between the launchers
//! (`kv.rs`, `compress.rs`) and `kernels/*.cu`. Their sizes are passed to NVRTC
//! (`sources::options`), so that a layout mismatch is a compile error; they live below both
//! the launchers and the compiler options for that reason.

/// `kernels/kv.cu`
pub mod kv {
    pub const MAX_LAYERS: usize = 32;
    pub const MAX_APPEND_LAYERS: usize = 24;
    pub const MAX_HALF: usize = 128;
    /// Distinct deltas a block keeps cos / sin tables of in shared memory.
    pub const MAX_TABLE: usize = 32;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct RopeArgs {
        pub(crate) inv_freq: [f64; MAX_HALF],
        pub(crate) comp: [u8; MAX_HALF],
        pub(crate) half: i32,
        pub(crate) head_dim: i32,
        pub(crate) interleaved: i32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub(crate) struct DeltaArgs {
        pub(crate) ptr: u64,
        pub(crate) same: [i64; 3],
        pub(crate) token_stride: i64,
        pub(crate) comp_stride: i64,
        pub(crate) kind: i32,
        pub(crate) is_i64: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    pub(crate) struct AngleSource {
        pub(crate) map: u64,
        pub(crate) table_rows: i32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct RerotateArgs {
        pub(crate) layers: [u64; MAX_LAYERS],
        pub(crate) tokens: i64,
        pub(crate) token_stride: i64,
        pub(crate) head_stride: i64,
        pub(crate) dim_stride: i64,
        pub(crate) delta: DeltaArgs,
        pub(crate) rope: RopeArgs,
        pub(crate) n_layers: i32,
        pub(crate) heads: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct RelocateArgs {
        pub(crate) keys: [u64; MAX_LAYERS],
        pub(crate) values: [u64; MAX_LAYERS],
        pub(crate) key_strides: [i64; 4],
        pub(crate) value_strides: [i64; 4],
        pub(crate) start: i64,
        pub(crate) end: i64,
        pub(crate) moved: i64,
        pub(crate) seg_rows: i64,
        pub(crate) removed: i64,
        pub(crate) n_runs: i64,
        pub(crate) runs: u64,
        pub(crate) delta: DeltaArgs,
        pub(crate) angles: AngleSource,
        pub(crate) rope: RopeArgs,
        pub(crate) n_layers: i32,
        pub(crate) batch: i32,
        pub(crate) heads: i32,
        pub(crate) key_dim: i32,
        pub(crate) value_dim: i32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct AppendArgs {
        pub(crate) keys: [u64; MAX_APPEND_LAYERS],
        pub(crate) values: [u64; MAX_APPEND_LAYERS],
        pub(crate) new_keys: [u64; MAX_APPEND_LAYERS],
        pub(crate) new_values: [u64; MAX_APPEND_LAYERS],
        pub(crate) key_strides: [i64; 4],
        pub(crate) value_strides: [i64; 4],
        pub(crate) new_key_strides: [i64; 4],
        pub(crate) new_value_strides: [i64; 4],
        pub(crate) positions: u64,
        pub(crate) start: i64,
        pub(crate) n: i64,
        pub(crate) delta: DeltaArgs,
        pub(crate) rope: RopeArgs,
        pub(crate) rotate: i32,
        pub(crate) n_layers: i32,
        pub(crate) batch: i32,
        pub(crate) heads: i32,
        pub(crate) key_dim: i32,
        pub(crate) value_dim: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct PagedArgs {
        pub(crate) caches: [u64; MAX_LAYERS],
        pub(crate) block_stride: i64,
        pub(crate) slot_stride: i64,
        pub(crate) head_stride: i64,
        pub(crate) dim_stride: i64,
        pub(crate) value_offset: i64,
        pub(crate) entries: u64,
        pub(crate) n_entries: i64,
        pub(crate) seg_entries: i64,
        pub(crate) staging: u64,
        pub(crate) layer0: i64,
        pub(crate) delta: DeltaArgs,
        pub(crate) angles: AngleSource,
        pub(crate) rope: RopeArgs,
        pub(crate) mode: i32,
        pub(crate) n_layers: i32,
        pub(crate) total_layers: i32,
        pub(crate) heads: i32,
        pub(crate) head_dim: i32,
        pub(crate) block_size: i32,
    }

    /// Sizes of the argument structs, checked against the .cu file at compile time.
    pub(crate) fn sizes() -> Vec<(&'static str, usize)> {
        vec![
            ("RerotateArgs", std::mem::size_of::<RerotateArgs>()),
            ("RelocateArgs", std::mem::size_of::<RelocateArgs>()),
            ("AppendArgs", std::mem::size_of::<AppendArgs>()),
            ("PagedArgs", std::mem::size_of::<PagedArgs>()),
        ]
    }
}

/// `kernels/compress.cu`
pub mod compress {
    pub const MAX_GRIDS: usize = 64;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct PoolArgs {
        pub(crate) x: u64,
        pub(crate) out: u64,
        pub(crate) row_stride: i64,
        pub(crate) col_stride: i64,
        pub(crate) dim: i64,
        pub(crate) in_start: [i64; MAX_GRIDS],
        pub(crate) out_start: [i64; MAX_GRIDS + 1],
        pub(crate) t: [i32; MAX_GRIDS],
        pub(crate) h: [i32; MAX_GRIDS],
        pub(crate) w: [i32; MAX_GRIDS],
        pub(crate) num_grids: i32,
        pub(crate) kh: i32,
        pub(crate) kw: i32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct ScoresArgs {
        pub(crate) query: u64,
        pub(crate) keys: u64,
        pub(crate) lse: u64,
        pub(crate) row_lse: u64,
        pub(crate) out: u64,
        pub(crate) query_strides: [i64; 3],
        pub(crate) key_strides: [i64; 3],
        pub(crate) lse_strides: [i64; 2],
        pub(crate) q_tokens: i64,
        pub(crate) k_tokens: i64,
        pub(crate) q_heads: i32,
        pub(crate) kv_heads: i32,
        pub(crate) head_dim: i32,
        pub(crate) lse_dtype: i32,
        pub(crate) scale: f32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct SelectArgs {
        pub(crate) scores: u64,
        pub(crate) out: u64,
        pub(crate) n: i64,
        pub(crate) stride: i64,
        pub(crate) count: i64,
        pub(crate) dtype: i32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct MassArgs {
        pub(crate) scores: u64,
        pub(crate) out: u64,
        pub(crate) header: u64,
        pub(crate) n: i64,
        pub(crate) stride: i64,
        pub(crate) mass: f64,
        pub(crate) min_keep: i64,
        pub(crate) max_keep: i64,
        pub(crate) dtype: i32,
        pub(crate) pow2: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct GatherArgs {
        pub(crate) x: u64,
        pub(crate) out: u64,
        pub(crate) indices: u64,
        pub(crate) count: i64,
        pub(crate) dim: i64,
        pub(crate) row_stride: i64,
        pub(crate) col_stride: i64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct CellsArgs {
        pub(crate) indices: u64,
        pub(crate) out: u64,
        pub(crate) count: i64,
        pub(crate) in_start: [i64; MAX_GRIDS + 1],
        pub(crate) t: [i32; MAX_GRIDS],
        pub(crate) h: [i32; MAX_GRIDS],
        pub(crate) w: [i32; MAX_GRIDS],
        pub(crate) num_grids: i32,
        pub(crate) pad: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct ComplementArgs {
        pub(crate) kept: u64,
        pub(crate) dropped: u64,
        pub(crate) n: i64,
        pub(crate) count: i64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct NormArgs {
        pub(crate) x: u64,
        pub(crate) out: u64,
        pub(crate) rows: u64,
        pub(crate) count: i64,
        pub(crate) dim: i64,
        pub(crate) row_stride: i64,
        pub(crate) col_stride: i64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct SimilarityArgs {
        pub(crate) x: u64,
        pub(crate) kept: u64,
        pub(crate) dropped: u64,
        pub(crate) inv_norms: u64,
        pub(crate) target: u64,
        pub(crate) n_kept: i64,
        pub(crate) n_dropped: i64,
        pub(crate) dim: i64,
        pub(crate) row_stride: i64,
        pub(crate) col_stride: i64,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(crate) struct MergeArgs {
        pub(crate) x: u64,
        pub(crate) out: u64,
        pub(crate) kept: u64,
        pub(crate) dropped: u64,
        pub(crate) target: u64,
        pub(crate) n_kept: i64,
        pub(crate) n_dropped: i64,
        pub(crate) dim: i64,
        pub(crate) row_stride: i64,
        pub(crate) col_stride: i64,
    }

    /// Sizes of the argument structs, checked against the .cu file at compile time.
    pub(crate) fn sizes() -> Vec<(&'static str, usize)> {
        use std::mem::size_of;
        vec![
            ("PoolArgs", size_of::<PoolArgs>()),
            ("ScoresArgs", size_of::<ScoresArgs>()),
            ("SelectArgs", size_of::<SelectArgs>()),
            ("MassArgs", size_of::<MassArgs>()),
            ("GatherArgs", size_of::<GatherArgs>()),
            ("CellsArgs", size_of::<CellsArgs>()),
            ("ComplementArgs", size_of::<ComplementArgs>()),
            ("NormArgs", size_of::<NormArgs>()),
            ("SimilarityArgs", size_of::<SimilarityArgs>()),
            ("MergeArgs", size_of::<MergeArgs>()),
        ]
    }
}
