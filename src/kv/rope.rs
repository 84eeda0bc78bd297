//! Rotation of cached keys by a position delta: the RoPE configuration, the per-delta cos/sin
//! tables and the row kernels.
//!
//! A key stored at position `p` holds `R(p) k`. Rotating it by `R(d)` gives `R(p + d) k`, the key
//! the model would have stored at `p + d`. The angle of pair `i` is `d * inv_freq[i]`, computed
//! in f64 from the integer delta: never as the difference of two large angles, whose f32
//! rounding error grows with the position.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::error::Result;
use crate::value_err;

/// Largest `head_dim` accepted (models use 64 to 256); the rotation tables are sized by it.
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// How keys were rotated: the RoPE parameters, under the same names everywhere
/// (`rope_theta`, `head_dim`, `rotary_dim`, `interleaved`, `mrope_section`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// RoPE base: pair `i` turns at `rope_theta ** (-2 i / rotary_dim)` radians per position.
    pub rope_theta: f64,
    /// Size of one key vector.
    pub head_dim: usize,
    /// Leading dimensions that rotate (`<= head_dim`, even); the rest pass through unchanged.
    pub rotary_dim: usize,
    /// GPT-J pairing `(2i, 2i + 1)` when true; NeoX / Llama / Qwen half-split pairing
    /// `(i, i + rotary_dim / 2)` when false.
    pub interleaved: bool,
    /// M-RoPE sections, summing to `rotary_dim / 2`. How frequency pairs map to the (t, h, w)
    /// components of the delta depends on `mrope_interleaved`.
    pub mrope_section: Option<Vec<usize>>,
    /// The frequency-to-axis map of M-RoPE ([`mrope_components`]):
    /// - `false` (Qwen2-VL, Qwen2.5-VL, GLM-4.1V): contiguous runs, section `j` turning with the
    ///   (t, h, w)[j % 3] component (transformers' `freqs.split(mrope_section)`);
    /// - `true` (Qwen3-VL, Qwen3.5; transformers' `apply_interleaved_mrope`, vLLM's
    ///   `mrope_interleaved`): exactly three sections `[s_t, s_h, s_w]`; frequency pair `j`
    ///   turns with h if `j % 3 == 1 && j < 3 s_h`, with w if `j % 3 == 2 && j < 3 s_w`, else
    ///   with t.
    ///
    /// Independent of the pair layout (`interleaved`) and of partial rotary (`rotary_dim`):
    /// pair `j` is the one turning at `inv_freq[j]`.
    pub mrope_interleaved: bool,
}

impl RopeConfig {
    /// Checks the parameters; `rotary_dim` defaults to `head_dim`.
    pub fn new(
        rope_theta: f64,
        head_dim: usize,
        rotary_dim: Option<usize>,
        interleaved: bool,
        mrope_section: Option<Vec<usize>>,
    ) -> Result<Self> {
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(value_err!(
                "rope_theta = {rope_theta}: must be a finite number > 0"
            ));
        }
        if head_dim == 0 {
            return Err(value_err!("head_dim = 0: must be >= 2"));
        }
        // Checked before any table sized by it is built (the tensor's own size is compared later).
        if head_dim > MAX_HEAD_DIM {
            return Err(value_err!(
                "head_dim = {head_dim}: must be <= {MAX_HEAD_DIM} (the size of one key vector)"
            ));
        }
        if rotary_dim.is_none() && head_dim % 2 != 0 {
            return Err(value_err!(
                "head_dim = {head_dim}: must be even when rotary_dim is not given (all of it rotates, in pairs)"
            ));
        }
        let rotary_dim = rotary_dim.unwrap_or(head_dim);
        if rotary_dim == 0 || rotary_dim % 2 != 0 {
            return Err(value_err!(
                "rotary_dim = {rotary_dim}: must be even and >= 2 (RoPE rotates pairs of dimensions)"
            ));
        }
        if rotary_dim > head_dim {
            return Err(value_err!(
                "rotary_dim = {rotary_dim}: must be <= head_dim = {head_dim}"
            ));
        }
        if let Some(sections) = &mrope_section {
            let total: usize = sections.iter().sum();
            if sections.is_empty() || total != rotary_dim / 2 {
                return Err(value_err!(
                    "mrope_section = {sections:?}: must sum to rotary_dim / 2 = {}, got {total}",
                    rotary_dim / 2
                ));
            }
        }
        Ok(Self {
            rope_theta,
            head_dim,
            rotary_dim,
            interleaved,
            mrope_section,
            mrope_interleaved: false,
        })
    }

    /// The same configuration with the interleaved (`true`) or contiguous (`false`) M-RoPE
    /// frequency map (see [`RopeConfig::mrope_interleaved`]). Interleaving needs
    /// `mrope_section` with exactly three entries `[t, h, w]`.
    pub fn with_mrope_interleaved(mut self, mrope_interleaved: bool) -> Result<Self> {
        if mrope_interleaved {
            match &self.mrope_section {
                None => {
                    return Err(value_err!(
                        "mrope_interleaved = True needs mrope_section (e.g. [24, 20, 20] for Qwen3-VL)"
                    ))
                }
                Some(s) if s.len() != 3 => {
                    return Err(value_err!(
                        "mrope_section = {s:?}: interleaved M-RoPE takes exactly three sections [t, h, w]"
                    ))
                }
                Some(_) => {}
            }
        }
        self.mrope_interleaved = mrope_interleaved;
        Ok(self)
    }

    pub fn is_mrope(&self) -> bool {
        self.mrope_section.is_some()
    }
}

/// The delta component (0 = t, 1 = h, 2 = w) that turns each of the `rotary_dim / 2`
/// frequency pairs: all 0 without M-RoPE, else the map [`RopeConfig::mrope_interleaved`]
/// describes. The CPU rows and the CUDA kernels (`RopeArgs::comp`) both read this one map.
pub fn mrope_components(config: &RopeConfig) -> Vec<u8> {
    let half = config.rotary_dim / 2;
    let mut component = vec![0u8; half];
    let Some(sections) = &config.mrope_section else {
        return component;
    };
    if config.mrope_interleaved {
        // transformers' apply_interleaved_mrope: t everywhere, then h at 1, 4, ... < 3 s_h and
        // w at 2, 5, ... < 3 s_w.
        // (A config built field by field with fewer sections gets 0 for the missing ones.)
        let s_h = sections.get(1).copied().unwrap_or(0);
        let s_w = sections.get(2).copied().unwrap_or(0);
        for (j, c) in component.iter_mut().enumerate() {
            if j % 3 == 1 && j < 3 * s_h {
                *c = 1;
            } else if j % 3 == 2 && j < 3 * s_w {
                *c = 2;
            }
        }
    } else {
        // transformers' Qwen2-VL: freqs.split(mrope_section)[j] takes its angles from the
        // (t, h, w)[j % 3] positions, and the same split repeats on the second half.
        let mut pair = 0;
        for (j, &len) in sections.iter().enumerate() {
            component[pair..pair + len].fill((j % 3) as u8);
            pair += len;
        }
    }
    component
}

/// Position deltas, one per token (or one for all).
#[derive(Debug, Clone, Copy)]
pub enum Deltas<'a> {
    /// The same delta for every token (every M-RoPE component).
    Same(i64),
    /// One delta per token; with M-RoPE it applies to all three components (text tokens).
    PerToken(&'a [i64]),
    /// One (t, h, w) delta per token; M-RoPE only.
    PerTokenThw(&'a [[i64; 3]]),
}

impl Deltas<'_> {
    /// Checks the count against `tokens` and the kind against the configuration.
    pub(crate) fn check(&self, tokens: usize, config: &RopeConfig, what: &str) -> Result<()> {
        match self {
            Deltas::Same(_) => Ok(()),
            Deltas::PerToken(d) => check_delta_shape(d.len(), false, tokens, config, what),
            Deltas::PerTokenThw(d) => check_delta_shape(d.len(), true, tokens, config, what),
        }
    }

    fn get(&self, token: usize) -> [i64; 3] {
        match self {
            Deltas::Same(d) => [*d; 3],
            Deltas::PerToken(d) => [d[token]; 3],
            Deltas::PerTokenThw(d) => d[token],
        }
    }
}

/// Per-token deltas held in a CUDA int32 / int64 tensor `[n]` or `[n, 3]` (read in place by
/// the kernels).
#[derive(Debug, Clone, Copy)]
pub struct DeviceDeltas {
    pub ptr: u64,
    pub is_i64: bool,
    pub len: usize,
    /// `[n, 3]` (t, h, w) rather than `[n]`.
    pub thw: bool,
    /// Strides in elements.
    pub token_stride: i64,
    pub comp_stride: i64,
}

/// The deltas a kernel reads: from the host, or from device memory.
#[derive(Debug, Clone, Copy)]
pub enum KernelDeltas<'a> {
    Host(Deltas<'a>),
    Device(DeviceDeltas),
}

impl KernelDeltas<'_> {
    /// Checks the count against `tokens` and the kind against the configuration.
    pub(crate) fn check(&self, tokens: usize, config: &RopeConfig, what: &str) -> Result<()> {
        match self {
            KernelDeltas::Host(d) => d.check(tokens, config, what),
            KernelDeltas::Device(d) => check_delta_shape(d.len, d.thw, tokens, config, what),
        }
    }
}

/// [`Deltas::check`] for deltas held elsewhere (e.g. on a GPU): `len` per-token deltas, with
/// (t, h, w) components when `thw`.
fn check_delta_shape(
    len: usize,
    thw: bool,
    tokens: usize,
    config: &RopeConfig,
    what: &str,
) -> Result<()> {
    if thw && !config.is_mrope() {
        return Err(value_err!(
            "delta has shape ({len}, 3) (t, h, w deltas) but mrope_section is None: plain RoPE takes one delta per token, shape ({tokens},)"
        ));
    }
    if len != tokens {
        return Err(value_err!(
            "delta has {len} entries but {what} has {tokens}"
        ));
    }
    Ok(())
}

/// A checked [`RopeConfig`] with its inverse frequencies (f64) and, per frequency pair, the
/// delta component (0 = t, 1 = h, 2 = w) that turns it.
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    inv_freq: Vec<f64>,
    component: Vec<u8>,
}

impl Rope {
    pub fn new(config: RopeConfig) -> Self {
        let half = config.rotary_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                config
                    .rope_theta
                    .powf(-((2 * i) as f64) / config.rotary_dim as f64)
            })
            .collect();
        let component = mrope_components(&config);
        Self {
            config,
            inv_freq,
            component,
        }
    }

    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// `rope_theta ** (-2 i / rotary_dim)` of each frequency pair, in f64.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// The delta component (0 = t, 1 = h, 2 = w) that turns each frequency pair.
    pub fn components(&self) -> &[u8] {
        &self.component
    }

    /// The (t, h, w) delta of `token`.
    pub(crate) fn delta_of(deltas: &Deltas<'_>, token: usize) -> [i64; 3] {
        deltas.get(token)
    }

    /// cos and sin of `delta[component[i]] * inv_freq[i]` for each pair `i`, computed in f64.
    fn fill_angles(&self, delta: [i64; 3], cos: &mut [f32], sin: &mut [f32]) {
        for i in 0..self.inv_freq.len() {
            let angle = delta[self.component[i] as usize] as f64 * self.inv_freq[i];
            let (s, c) = angle.sin_cos();
            cos[i] = c as f32;
            sin[i] = s as f32;
        }
    }

    /// The cos/sin table for `tokens` tokens, one row per distinct delta.
    pub(crate) fn table(&self, deltas: Deltas<'_>, tokens: usize) -> AngleTable {
        let half = self.inv_freq.len();
        // Many tokens share a delta (all text after an evicted image): one row each.
        let (keys, index): (Vec<[i64; 3]>, Vec<u32>) = match deltas {
            Deltas::Same(d) => (vec![[d; 3]], Vec::new()),
            _ => {
                let mut rows: HashMap<[i64; 3], u32> = HashMap::new();
                let mut keys = Vec::new();
                let index = (0..tokens)
                    .map(|t| {
                        let key = deltas.get(t);
                        *rows.entry(key).or_insert_with(|| {
                            keys.push(key);
                            (keys.len() - 1) as u32
                        })
                    })
                    .collect();
                (keys, index)
            }
        };
        let mut cos = vec![0f32; keys.len() * half];
        let mut sin = vec![0f32; keys.len() * half];
        if half > 0 {
            cos.par_chunks_mut(half)
                .zip(sin.par_chunks_mut(half))
                .zip(keys.par_iter())
                .with_min_len(64)
                .for_each(|((c, s), &key)| self.fill_angles(key, c, s));
        }
        let identity = keys.iter().map(|k| *k == [0; 3]).collect();
        AngleTable {
            half,
            cos,
            sin,
            index,
            identity,
        }
    }
}

/// cos/sin rows per distinct delta and the row of each token.
pub(crate) struct AngleTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Row per token; empty when every token shares row 0.
    index: Vec<u32>,
    /// Rows whose delta is zero: the rotation is the identity and can be skipped.
    identity: Vec<bool>,
}

impl AngleTable {
    /// (cos, sin, is_identity) of `token`.
    #[inline]
    pub(crate) fn row(&self, token: usize) -> (&[f32], &[f32], bool) {
        let r = if self.index.is_empty() {
            0
        } else {
            self.index[token] as usize
        };
        let span = r * self.half..(r + 1) * self.half;
        (&self.cos[span.clone()], &self.sin[span], self.identity[r])
    }
}

/// An element the row kernels convert inline: f32, or bf16 as its bits (u16). Both
/// conversions are branch-free so the loops vectorise (f16 goes through `half`'s slice
/// conversions instead).
pub(crate) trait Lane: Copy {
    fn load(self) -> f32;
    fn store(value: f32) -> Self;
}

impl Lane for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(value: f32) -> Self {
        value
    }
}

/// bf16 bits.
impl Lane for u16 {
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[inline(always)]
    fn store(value: f32) -> Self {
        bf16_bits(value)
    }
}

/// f32 to bf16 bits, round to nearest even (as `half` and PyTorch), NaN kept quiet.
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        ((x >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// [`rotate_in_place`], compiled for AVX2 as well and picked at run time (the default x86-64
/// target has only SSE2, which packs bf16 poorly).
#[inline]
pub(crate) fn rotate_in_place_dispatch<L: Lane>(
    row: &mut [L],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { rotate_in_place_avx2(row, cos, sin, interleaved) };
    }
    rotate_in_place(row, cos, sin, interleaved)
}

/// [`rotate_into`], compiled for AVX2 as well and picked at run time.
#[inline]
pub(crate) fn rotate_into_dispatch<L: Lane>(
    src: &[L],
    dst: &mut [L],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { rotate_into_avx2(src, dst, cos, sin, interleaved) };
    }
    rotate_into(src, dst, cos, sin, interleaved)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rotate_in_place_avx2<L: Lane>(
    row: &mut [L],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    rotate_in_place(row, cos, sin, interleaved)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rotate_into_avx2<L: Lane>(
    src: &[L],
    dst: &mut [L],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    rotate_into(src, dst, cos, sin, interleaved)
}

/// Rotates `row[..rotary_dim]` in place (pairs as configured); the rest is untouched.
#[inline(always)]
pub(crate) fn rotate_in_place<L: Lane>(row: &mut [L], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for ((pair, &c), &s) in row[..2 * half].chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x1, x2) = (pair[0].load(), pair[1].load());
            pair[0] = L::store(x1 * c - x2 * s);
            pair[1] = L::store(x2 * c + x1 * s);
        }
    } else {
        let (first, second) = row[..2 * half].split_at_mut(half);
        for (((a, b), &c), &s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
            let (x1, x2) = (a.load(), b.load());
            *a = L::store(x1 * c - x2 * s);
            *b = L::store(x2 * c + x1 * s);
        }
    }
}

/// Writes the rotation of `src` to `dst` (pass-through dims copied); `src` and `dst` are distinct rows.
#[inline(always)]
pub(crate) fn rotate_into<L: Lane>(
    src: &[L],
    dst: &mut [L],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let rot = 2 * cos.len();
    let half = cos.len();
    if interleaved {
        for (((d, s_pair), &c), &s) in dst[..rot]
            .chunks_exact_mut(2)
            .zip(src[..rot].chunks_exact(2))
            .zip(cos)
            .zip(sin)
        {
            let (x1, x2) = (s_pair[0].load(), s_pair[1].load());
            d[0] = L::store(x1 * c - x2 * s);
            d[1] = L::store(x2 * c + x1 * s);
        }
    } else {
        let (d1, d2) = dst[..rot].split_at_mut(half);
        let (s1, s2) = src[..rot].split_at(half);
        for ((((a, b), (&x1, &x2)), &c), &s) in d1
            .iter_mut()
            .zip(d2.iter_mut())
            .zip(s1.iter().zip(s2))
            .zip(cos)
            .zip(sin)
        {
            let (x1, x2) = (x1.load(), x2.load());
            *a = L::store(x1 * c - x2 * s);
            *b = L::store(x2 * c + x1 * s);
        }
    }
    dst[rot..].copy_from_slice(&src[rot..]);
}
