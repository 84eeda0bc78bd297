//! Qwen2-VL's image resizing rule and the token count it implies, as transformers 5.24's
//! `Qwen2VLImageProcessor` (torchvision backend) and `Qwen2VLImageProcessorPil` apply it: both
//! call the same `smart_resize(height, width, factor=patch_size * merge_size,
//! min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])`. Qwen2.5-VL, Qwen3-VL and
//! Qwen3.5 use the same rule; GLM-4.1V's `Glm4vImageProcessor` has its own ([`ResizeRule::Glm4v`]).
//!
//! The float operations are those of the Python function, in the same order, in f64 (Python's
//! `float`); `round` is Python's round-half-to-even. Integer ratios are exact in f64 as long as
//! the operands stay below 2^53, which is checked.

use crate::error::Result;
use crate::value_err;

/// 2^53: integers up to here are exact in f64, so Python's `int / int` equals the f64 quotient.
const EXACT_F64_INT: i128 = 1 << 53;

/// Which image processor's `smart_resize` decides the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResizeRule {
    /// Qwen2-VL's (also Qwen2.5-VL, Qwen3-VL, Qwen3.5).
    #[default]
    Qwen2Vl,
    /// GLM-4.1V's (`glm4v.image_processing_glm4v.smart_resize`): an image counts as
    /// `temporal_patch_size` frames against the pixel bounds (so it gets half the pixels of
    /// Qwen2-VL's rule at the same bounds), and a side below `factor` is scaled up first.
    Glm4v { temporal_patch_size: i64 },
}

/// The settings of the image processor that decide the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageSettings {
    /// `patch_size` (14).
    pub patch_size: i64,
    /// `merge_size` (2): `merge_size x merge_size` patches become one token.
    pub merge_size: i64,
    /// `size["shortest_edge"]`, alias `min_pixels` (56 * 56 = 3136).
    pub min_pixels: i64,
    /// `size["longest_edge"]`, alias `max_pixels` (28 * 28 * 1280 = 1003520).
    pub max_pixels: i64,
    /// The processor family's resize rule.
    pub rule: ResizeRule,
}

impl Default for ImageSettings {
    /// `Qwen2VLImageProcessor()`'s defaults (also those of Qwen2-VL's preprocessor_config.json).
    fn default() -> Self {
        ImageSettings {
            patch_size: 14,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            rule: ResizeRule::Qwen2Vl,
        }
    }
}

impl ResizeRule {
    /// The rule by its name: `"qwen2_vl"` or `"glm4v"` (with the processor's
    /// `temporal_patch_size`).
    pub fn parse(name: &str, temporal_patch_size: i64) -> Result<ResizeRule> {
        match name {
            "qwen2_vl" => Ok(ResizeRule::Qwen2Vl),
            "glm4v" => {
                positive("temporal_patch_size", temporal_patch_size)?;
                Ok(ResizeRule::Glm4v {
                    temporal_patch_size,
                })
            }
            other => Err(value_err!(
                "rule must be \"qwen2_vl\" (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) or \"glm4v\" (GLM-4.1V), got {other:?}"
            )),
        }
    }
}

impl ImageSettings {
    /// The image settings of the family's released checkpoints (their preprocessor_config.json):
    /// Qwen2-VL / Qwen2.5-VL as [`Default`]; Qwen3-VL and Qwen3.5 patch 16 (factor 32),
    /// `shortest_edge` 65536, `longest_edge` 16777216; GLM-4.1V / GLM-4.5V patch 14,
    /// `shortest_edge` 12544, `longest_edge` 9633792 and GLM's resize rule (temporal patch 2).
    pub fn for_model(model_type: super::ModelType) -> ImageSettings {
        use super::ModelType as M;
        match model_type {
            M::Qwen2Vl | M::Qwen2_5Vl => ImageSettings::default(),
            M::Qwen3Vl | M::Qwen3VlMoe | M::Qwen3_5 | M::Qwen3_5Moe => ImageSettings {
                patch_size: 16,
                merge_size: 2,
                min_pixels: 65536,
                max_pixels: 16777216,
                rule: ResizeRule::Qwen2Vl,
            },
            M::Glm4v | M::Glm4vMoe => ImageSettings {
                patch_size: 14,
                merge_size: 2,
                min_pixels: 12544,
                max_pixels: 9633792,
                rule: ResizeRule::Glm4v {
                    temporal_patch_size: 2,
                },
            },
        }
    }

    /// `patch_size * merge_size`: both sides of the resized image are multiples of it.
    pub fn factor(&self) -> Result<i64> {
        positive("patch_size", self.patch_size)?;
        positive("merge_size", self.merge_size)?;
        self.patch_size
            .checked_mul(self.merge_size)
            .filter(|&f| (f as i128) < EXACT_F64_INT)
            .ok_or_else(|| {
                value_err!(
                    "patch_size * merge_size must be < 2**53, got {} * {}",
                    self.patch_size,
                    self.merge_size
                )
            })
    }
}

fn positive(name: &str, value: i64) -> Result<()> {
    if value < 1 {
        return Err(value_err!("{name} must be >= 1, got {value}"));
    }
    Ok(())
}

fn below_2_53(name: &str, value: i128) -> Result<()> {
    if value >= EXACT_F64_INT {
        return Err(value_err!("{name} must be < 2**53, got {value}"));
    }
    Ok(())
}

/// `smart_resize`: the `(height, width)` an image is resized to. Both are multiples of
/// `factor`, the pixel count is brought into `[min_pixels, max_pixels]` by scaling, and the
/// aspect ratio is kept as far as the rounding allows.
///
/// Errors (`Error::Value`): a size, `factor` or pixel bound < 1; an aspect ratio above 200
/// (the processor's own error); values so large that Python's float arithmetic could no longer
/// be reproduced exactly (`height * width >= 2**53`).
pub fn smart_resize(
    height: i64,
    width: i64,
    factor: i64,
    min_pixels: i64,
    max_pixels: i64,
) -> Result<(i64, i64)> {
    resize(
        height,
        width,
        factor,
        min_pixels,
        max_pixels,
        ResizeRule::Qwen2Vl,
    )
}

/// [`smart_resize`] with the family's rule: `ResizeRule::Glm4v` is GLM-4.1V's `smart_resize`
/// for an image (`num_frames = temporal_factor = temporal_patch_size`). Same errors, and
/// `temporal_patch_size` < 1.
pub fn resize(
    height: i64,
    width: i64,
    factor: i64,
    min_pixels: i64,
    max_pixels: i64,
    rule: ResizeRule,
) -> Result<(i64, i64)> {
    positive("height", height)?;
    positive("width", width)?;
    positive("factor", factor)?;
    positive("min_pixels", min_pixels)?;
    positive("max_pixels", max_pixels)?;
    below_2_53("height * width", height as i128 * width as i128)?;
    below_2_53("factor", factor as i128)?;
    below_2_53("min_pixels", min_pixels as i128)?;
    below_2_53("max_pixels", max_pixels as i128)?;
    let (mut height, mut width) = (height, width);
    let frames = match rule {
        ResizeRule::Qwen2Vl => 1,
        ResizeRule::Glm4v {
            temporal_patch_size,
        } => {
            positive("temporal_patch_size", temporal_patch_size)?;
            if height < factor || width < factor {
                // GLM scales a thin image up until both sides reach factor (int() truncates).
                let f = factor as f64;
                let scale = (f / height as f64).max(f / width as f64);
                height = (height as f64 * scale) as i64;
                width = (width as f64 * scale) as i64;
            }
            // t_bar = round(num_frames / temporal_factor) * temporal_factor with both equal.
            temporal_patch_size as i128
        }
    };
    let pixels = frames * height as i128 * width as i128;
    below_2_53("frames * height * width", pixels)?;

    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(value_err!(
            "height = {height}, width = {width}: the aspect ratio must be at most 200 (the processor refuses it), got {ratio:.1}"
        ));
    }
    let mut h_bar = (h / f).round_ties_even() as i128 * factor as i128;
    let mut w_bar = (w / f).round_ties_even() as i128 * factor as i128;
    if frames * h_bar * w_bar > max_pixels as i128 {
        let beta = (pixels as f64 / max_pixels as f64).sqrt();
        h_bar = (factor as i128).max((h / beta / f).floor() as i128 * factor as i128);
        w_bar = (factor as i128).max((w / beta / f).floor() as i128 * factor as i128);
    } else if frames * h_bar * w_bar < min_pixels as i128 {
        let beta = (min_pixels as f64 / pixels as f64).sqrt();
        h_bar = (h * beta / f).ceil() as i128 * factor as i128;
        w_bar = (w * beta / f).ceil() as i128 * factor as i128;
    }
    let to_i64 = |v: i128, name: &str| {
        i64::try_from(v).map_err(|_| value_err!("the resized {name} {v} does not fit in 64 bits"))
    };
    Ok((to_i64(h_bar, "height")?, to_i64(w_bar, "width")?))
}

/// The processor's `image_grid_thw` row for one image: `(1, resized_h / patch, resized_w / patch)`.
pub fn image_grid_thw(height: i64, width: i64, settings: &ImageSettings) -> Result<[i64; 3]> {
    let factor = settings.factor()?;
    let (h, w) = resize(
        height,
        width,
        factor,
        settings.min_pixels,
        settings.max_pixels,
        settings.rule,
    )?;
    Ok([1, h / settings.patch_size, w / settings.patch_size])
}

/// Number of `<|image_pad|>` tokens one image becomes: `grid_h * grid_w / merge_size^2`.
pub fn image_token_count(height: i64, width: i64, settings: &ImageSettings) -> Result<i64> {
    let [_, gh, gw] = image_grid_thw(height, width, settings)?;
    // Both grid sides are multiples of merge_size, so this division is exact.
    Ok((gh / settings.merge_size) * (gw / settings.merge_size))
}
