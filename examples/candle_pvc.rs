//! PVC (Periodic Visual Calibration) in a candle generation loop, with tvc-rs doing the KV work.
//!
//! A small Qwen2-style decoder (RMSNorm, grouped-query attention with NeoX RoPE, SwiGLU; random
//! weights, the real Qwen2 vocabulary) reads a prompt holding an "image" (16 visual tokens on a
//! 4 x 4 grid, random embeddings standing in for a vision encoder) and generates greedily. The
//! reflection detector watches every sampled token; a random model never says "Wait", so the
//! schedule also calibrates every `period` tokens. At each calibration (TVC's `kv` mode):
//!
//! 1. the image's entries are evicted from every layer's cache and every later key is
//!    re-rotated to its new position (`relocate_span`);
//! 2. a bridge phrase is prefilled, then the image, 2 x 2-pooled (`pool_visual_tokens`), is run
//!    through the model and its keys and values are written with `append_entries`, which
//!    rotates the block's raw keys to their positions.
//!
//! A later calibration evicts the previous compressed block the same way, so that the cache
//! holds one copy of the image at a time.
//!
//! The example fails loudly when tvc-rs gets anything wrong: after each calibration every cached
//! key must equal the model's own RoPE applied to the raw key at the entry's new position.
//!
//! Run: `cargo run --release --features candle --example candle_pvc [-- TOKENIZER_JSON]`
//! (default tokenizer: `$TVC_ASSETS/qwen2-vl/tokenizer.json`, `$TVC_ASSETS` defaulting to
//! `../shared/assets`).

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use tvc_rs::candle as tc;

const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 128;
const ROPE_THETA: f64 = 1e6;
const IMAGE_GRID: [usize; 3] = [1, 4, 4];
const POOL: (usize, usize) = (2, 2);
const NEW_TOKENS: usize = 48;
const PERIOD: u64 = 16;
const VISION_START: u32 = 151652;
const VISION_END: u32 = 151653;
const IMAGE_PAD: u32 = 151655;
/// Re-rotated keys against the model's RoPE at the new position (f32, angles up to ~100 rad).
const KEY_TOLERANCE: f32 = 1e-4;

/// A small deterministic generator for the random weights (xorshift64*).
struct Weights(u64);

impl Weights {
    fn normal(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            // Sum of 4 uniforms: close enough to a normal for random weights.
            let s: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
            values.push(s * std * 1.7);
        }
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    mlp_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// One layer's cache: rotated keys and values `[1, kv_heads, seq, head_dim]` as attention reads
/// them, plus the raw (unrotated) keys and each entry's position, kept only to check tvc-rs.
struct LayerCache {
    keys: Tensor,
    values: Tensor,
    raw_keys: Tensor,
}

struct Model {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    inv_freq: Vec<f64>,
}

fn rms_norm(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
    x.broadcast_div(&scale)?.broadcast_mul(weight)
}

impl Model {
    fn new(vocab: usize, seed: u64) -> Result<Self> {
        let mut w = Weights(seed);
        let ones = Tensor::ones(HIDDEN, DType::F32, &Device::Cpu)?;
        let layers = (0..LAYERS)
            .map(|_| {
                Ok(Layer {
                    attn_norm: ones.clone(),
                    wq: w.normal(&[HIDDEN, HEADS * HEAD_DIM], 0.15)?,
                    wk: w.normal(&[HIDDEN, KV_HEADS * HEAD_DIM], 0.15)?,
                    wv: w.normal(&[HIDDEN, KV_HEADS * HEAD_DIM], 0.15)?,
                    wo: w.normal(&[HEADS * HEAD_DIM, HIDDEN], 0.15)?,
                    mlp_norm: ones.clone(),
                    gate: w.normal(&[HIDDEN, FFN], 0.15)?,
                    up: w.normal(&[HIDDEN, FFN], 0.15)?,
                    down: w.normal(&[FFN, HIDDEN], 0.1)?,
                })
            })
            .collect::<Result<_>>()?;
        let inv_freq = (0..HEAD_DIM / 2)
            .map(|i| 1.0 / ROPE_THETA.powf(2.0 * i as f64 / HEAD_DIM as f64))
            .collect();
        Ok(Model {
            embed: w.normal(&[vocab, HIDDEN], 1.0)?,
            layers,
            norm: ones,
            inv_freq,
        })
    }

    /// The model's own RoPE (NeoX halves): `x` `[1, heads, n, head_dim]` at `positions`.
    fn rope(&self, x: &Tensor, positions: &[i64]) -> Result<Tensor> {
        let half = HEAD_DIM / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in positions {
            for f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let n = positions.len();
        let cos = Tensor::from_vec(cos, (1, 1, n, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (1, 1, n, half), &Device::Cpu)?;
        let (a, b) = (
            x.narrow(D::Minus1, 0, half)?,
            x.narrow(D::Minus1, half, half)?,
        );
        let first = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let second = (b.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
        Tensor::cat(&[first, second], D::Minus1)
    }

    /// Runs `x` (`[n, hidden]` input embeddings) at `positions` on top of `cache`, appending
    /// the chunk's entries; returns the last row's logits. With `tvc_append` the entries are
    /// written by tvc-rs's `append_entries` (raw keys rotated by it to `positions`), otherwise
    /// by the model's own RoPE and `Tensor::cat`.
    fn forward(
        &self,
        x: &Tensor,
        positions: &[i64],
        cache: &mut [LayerCache],
        tvc_append: Option<&tc::Rope>,
    ) -> Result<Tensor> {
        let n = positions.len();
        let mut h = x.clone();
        for (layer, c) in self.layers.iter().zip(cache.iter_mut()) {
            let normed = rms_norm(&h, &layer.attn_norm)?;
            let heads = |w: &Tensor, count: usize| -> Result<Tensor> {
                normed
                    .matmul(w)?
                    .reshape((1, n, count, HEAD_DIM))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k_raw, v) = (
                heads(&layer.wq, HEADS)?,
                heads(&layer.wk, KV_HEADS)?,
                heads(&layer.wv, KV_HEADS)?,
            );
            let q = self.rope(&q, positions)?;
            let past = c.keys.dim(2)?;
            match tvc_append {
                None => {
                    c.keys = Tensor::cat(&[&c.keys, &self.rope(&k_raw, positions)?], 2)?;
                    c.values = Tensor::cat(&[&c.values, &v], 2)?;
                }
                Some(rope) => {
                    // Grow the cache by n entries, then let tvc-rs write them, rotating each
                    // raw key (position 0) by its position.
                    let empty =
                        Tensor::zeros((1, KV_HEADS, n, HEAD_DIM), DType::F32, &Device::Cpu)?;
                    c.keys = Tensor::cat(&[&c.keys, &empty], 2)?;
                    c.values = Tensor::cat(&[&c.values, &empty], 2)?;
                    let slots: Vec<i64> = (past..past + n).map(|p| p as i64).collect();
                    tc::append_entries(
                        std::slice::from_ref(&c.keys),
                        std::slice::from_ref(&c.values),
                        std::slice::from_ref(&k_raw),
                        std::slice::from_ref(&v),
                        &slots,
                        Some((tc::Deltas::PerToken(positions), rope)),
                    )?;
                }
            }
            c.raw_keys = Tensor::cat(&[&c.raw_keys, &k_raw], 2)?;
            // Grouped-query attention over the cache, causal inside the chunk.
            let group = HEADS / KV_HEADS;
            let total = past + n;
            let expand = |t: &Tensor| -> Result<Tensor> {
                t.unsqueeze(2)?
                    .broadcast_as((1, KV_HEADS, group, total, HEAD_DIM))?
                    .reshape((1, HEADS, total, HEAD_DIM))
            };
            let (k, v) = (expand(&c.keys)?, expand(&c.values)?);
            let scores = (q.matmul(&k.t()?)? / (HEAD_DIM as f64).sqrt())?;
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (1, 1, n, total), &Device::Cpu)?;
            let probs = candle_softmax(&scores.broadcast_add(&mask)?)?;
            let attn = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((n, HEADS * HEAD_DIM))?;
            h = (h + attn.matmul(&layer.wo)?)?;
            let normed = rms_norm(&h, &layer.mlp_norm)?;
            let gate = normed.matmul(&layer.gate)?;
            let silu = (&gate * candle_sigmoid(&gate)?)?;
            h = (h + (silu * normed.matmul(&layer.up)?)?.matmul(&layer.down)?)?;
        }
        let last = rms_norm(&h.i(n - 1)?.unsqueeze(0)?, &self.norm)?;
        last.matmul(&self.embed.t()?)?.squeeze(0)
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
        self.embed.index_select(&ids, 0)
    }
}

fn candle_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn candle_sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Largest difference between the cached keys and the model's RoPE of the raw keys at
/// `positions`, over all layers.
fn key_error(model: &Model, cache: &[LayerCache], positions: &[i64]) -> Result<f32> {
    let mut worst = 0f32;
    for c in cache {
        let want = model.rope(&c.raw_keys, positions)?;
        let err = (&c.keys - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(err);
    }
    Ok(worst)
}

fn main() -> Result<()> {
    let tokenizer_path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let assets = std::env::var_os("TVC_ASSETS")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/assets")
                });
            assets.join("qwen2-vl/tokenizer.json")
        });
    let detector = tc::Detector::from_path(&tokenizer_path, None)?;
    let vocab = detector.vocab_size();
    let model = Model::new(vocab, 0x7c5e_11d3_9a0b_42f1)?;
    let rope = tc::Rope::new(tc::RopeConfig::new(
        ROPE_THETA, HEAD_DIM, None, false, None,
    )?);
    let encode = |text: &str| Ok::<_, candle_core::Error>(detector.vocab().encode(text)?);

    // Prompt: question text, the image (vision_start, 16 image tokens, vision_end), more text.
    let image_tokens = IMAGE_GRID.iter().product::<usize>();
    let image = Weights(99).normal(&[image_tokens, HIDDEN], 1.0)?;
    let mut prompt = encode("<|im_start|>user\n")?;
    prompt.push(VISION_START);
    let image_start = prompt.len();
    prompt.extend(std::iter::repeat_n(IMAGE_PAD, image_tokens));
    let image_end = prompt.len();
    prompt.push(VISION_END);
    prompt.extend(encode(
        "How many objects are left? Think step by step.<|im_end|>\n<|im_start|>assistant\n",
    )?);
    // Input embeddings: text tokens from the table, the image's rows from the "encoder".
    let x = Tensor::cat(
        &[
            &model.embed_tokens(&prompt[..image_start])?,
            &image,
            &model.embed_tokens(&prompt[image_end..])?,
        ],
        0,
    )?;

    let empty = Tensor::zeros((1, KV_HEADS, 0, HEAD_DIM), DType::F32, &Device::Cpu)?;
    let mut cache: Vec<LayerCache> = (0..LAYERS)
        .map(|_| LayerCache {
            keys: empty.clone(),
            values: empty.clone(),
            raw_keys: empty.clone(),
        })
        .collect();
    // Position of every cached entry (the truth the re-rotated keys are checked against).
    let mut positions: Vec<i64> = (0..prompt.len() as i64).collect();
    let mut logits = model.forward(&x, &positions, &mut cache, None)?;
    let mut image_span = Some((image_start, image_end));

    let schedule = tc::Schedule::new(8, 8, Some(2), Some(PERIOD))?;
    let mut monitor = tc::Monitor::new(&detector, schedule, tc::ScheduleState::default());
    let mut generated: Vec<u32> = Vec::new();
    let mut calibrations = 0;
    println!(
        "candle PVC loop: {LAYERS} layers, {HEADS} heads ({KV_HEADS} KV), head_dim {HEAD_DIM}, vocab {vocab}, \
         prompt {} tokens (image {image_tokens} tokens at {image_start}..{image_end}), schedule {schedule:?}",
        prompt.len()
    );
    while generated.len() < NEW_TOKENS {
        let next = logits.argmax(0)?;
        let token = next.to_scalar::<u32>()?;
        generated.push(token);
        let next_position = positions.last().map_or(0, |p| p + 1);
        positions.push(next_position);
        logits = model.forward(
            &model.embed_tokens(&[token])?,
            &[next_position],
            &mut cache,
            None,
        )?;

        let Some(calibration) = tc::push_token(&mut monitor, &detector, &next)? else {
            continue;
        };
        calibrations += 1;
        let seq = cache[0].keys.dim(2)?;
        // 1. Evict the image (the first time; later calibrations evict the previous compressed
        //    block) and re-rotate every later key: RoPE positions move down by the span's length.
        let (start, end) = image_span.expect("an image span is cached");
        let evicted = end - start;
        let keys: Vec<Tensor> = cache.iter().map(|c| c.keys.clone()).collect();
        let values: Vec<Tensor> = cache.iter().map(|c| c.values.clone()).collect();
        let new_len = tc::relocate_span(
            &keys,
            &values,
            start,
            end,
            None,
            tc::Deltas::Same(-(evicted as i64)),
            &rope,
        )?;
        assert_eq!(new_len, seq - evicted, "relocate_span's new length");
        for c in cache.iter_mut() {
            c.keys = c.keys.narrow(2, 0, new_len)?;
            c.values = c.values.narrow(2, 0, new_len)?;
            c.raw_keys = Tensor::cat(
                &[
                    c.raw_keys.narrow(2, 0, start)?,
                    c.raw_keys.narrow(2, end, seq - end)?,
                ],
                2,
            )?;
        }
        positions.drain(start..end);
        for p in positions[start..].iter_mut() {
            *p -= evicted as i64;
        }
        let relocate_error = key_error(&model, &cache, &positions)?;
        assert!(
            relocate_error <= KEY_TOLERANCE,
            "relocate_span: re-rotated keys differ from the keys recomputed at the new positions by {relocate_error}"
        );
        // 2. Bridge phrase, then the pooled image written by append_entries.
        let bridge = encode(" Let me see the image again:")?;
        let first = positions.last().map_or(0, |p| p + 1);
        let bridge_positions: Vec<i64> = (first..first + bridge.len() as i64).collect();
        model.forward(
            &model.embed_tokens(&bridge)?,
            &bridge_positions,
            &mut cache,
            None,
        )?;
        positions.extend(&bridge_positions);
        let (pooled, pooled_grid) = tc::pool_visual_tokens(&image, &[IMAGE_GRID], POOL)?;
        let block = pooled.dim(0)?;
        let first = positions.last().map_or(0, |p| p + 1);
        let block_positions: Vec<i64> = (first..first + block as i64).collect();
        let block_start = cache[0].keys.dim(2)?;
        logits = model.forward(&pooled, &block_positions, &mut cache, Some(&rope))?;
        positions.extend(&block_positions);
        image_span = Some((block_start, block_start + block));
        let append_error = key_error(&model, &cache, &positions)?;
        assert!(
            append_error <= KEY_TOLERANCE,
            "append_entries: rotated keys differ from the model's RoPE by {append_error}"
        );
        let phrase = calibration
            .hit
            .map(|h| detector.phrases()[h.phrase as usize].clone());
        println!(
            "calibration {calibrations} at token {} ({:?}{}): evicted {evicted} entries at {start}..{end}, \
             re-rotated {} later keys per layer and head (max error {relocate_error:.2e}), bridge {} tokens, \
             appended {block} pooled image tokens (grid {:?}, max key error {append_error:.2e}); cache {} -> {}",
            calibration.token_index,
            calibration.reason,
            phrase.map(|p| format!(", '{p}'")).unwrap_or_default(),
            seq - end,
            bridge.len(),
            pooled_grid[0],
            seq,
            cache[0].keys.dim(2)?,
        );
    }
    let text = detector
        .vocab()
        .tokenizer()
        .decode(&generated, false)
        .map_err(candle_core::Error::msg)?;
    println!(
        "generated {} tokens: {:?}",
        generated.len(),
        text.chars().take(160).collect::<String>()
    );
    assert_eq!(calibrations, monitor.calibrations.len());
    assert!(
        calibrations >= 1,
        "the schedule (period {PERIOD}) should have calibrated"
    );
    println!("{calibrations} calibrations, every re-rotated and appended key checked against the model's RoPE");
    Ok(())
}
