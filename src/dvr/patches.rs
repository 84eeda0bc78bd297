//! The last step of Qwen2-VL's image processor in one pass: rescale and normalize a resized
//! `uint8` image and cut it into the flattened, merge-ordered patches the vision tower takes
//! (`pixel_values`), as transformers' `Qwen2VLImageProcessor._preprocess` does with a chain of
//! `to(float32)`, `sub`, `div_`, `repeat`, `cat`, `view`, `permute` and `reshape`.
//!
//! The float operations are the processor's, in the same order, in f32: `(x - mean) / std` with
//! the fused mean and std (`mean / rescale_factor`), so the values are bit for bit the same.

use rayon::prelude::*;

use crate::error::Result;
use crate::value_err;

/// How the vision tower cuts images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchSettings {
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
}

impl Default for PatchSettings {
    /// Qwen2-VL / Qwen2.5-VL: 14, 2, 2.
    fn default() -> Self {
        PatchSettings {
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
        }
    }
}

/// Largest patch_size / merge_size / temporal_patch_size accepted (Qwen2-VL: 14, 2, 2).
pub const MAX_PATCH_SETTING: usize = 1 << 10;

impl PatchSettings {
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("patch_size", self.patch_size),
            ("merge_size", self.merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
        ] {
            if v < 1 {
                return Err(value_err!("{name} must be >= 1, got {v}"));
            }
            // Checked before any size is computed from them (rows, row length, output).
            if v > MAX_PATCH_SETTING {
                return Err(value_err!("{name} must be <= {MAX_PATCH_SETTING}, got {v}"));
            }
        }
        Ok(())
    }

    /// Floats per patch row: `channels * temporal_patch_size * patch_size^2`.
    pub fn row_len(&self, channels: usize) -> usize {
        channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// A `uint8` image with `channels x height x width` elements at arbitrary non-negative
/// strides (in elements), e.g. CHW or a CHW view of HWC memory.
#[derive(Debug, Clone, Copy)]
pub struct ImageU8<'a> {
    pub data: &'a [u8],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Strides of the channel, row and column axes.
    pub strides: [usize; 3],
}

impl ImageU8<'_> {
    /// Checks that every element lies inside `data`.
    pub fn check(&self, name: &str) -> Result<()> {
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            return Err(value_err!(
                "{name}: shape ({}, {}, {}) has an empty axis",
                self.channels,
                self.height,
                self.width
            ));
        }
        let last = (self.channels - 1) * self.strides[0]
            + (self.height - 1) * self.strides[1]
            + (self.width - 1) * self.strides[2];
        if last >= self.data.len() {
            return Err(value_err!(
                "{name}: the strides reach past the end of the data"
            ));
        }
        Ok(())
    }
}

/// Patch rows of an image: `(height / patch) * (width / patch)`. Both sides must be multiples
/// of `patch_size * merge_size` (what `smart_resize` gives).
pub fn patch_rows(height: usize, width: usize, s: &PatchSettings) -> Result<usize> {
    s.check()?;
    let factor = s.patch_size * s.merge_size;
    if height % factor != 0 || width % factor != 0 {
        return Err(value_err!(
            "image size ({height}, {width}): both sides must be multiples of patch_size * merge_size = {factor} \
             (resize it with smart_resize first)"
        ));
    }
    Ok((height / s.patch_size) * (width / s.patch_size))
}

/// Writes the patches of `image` into `out` (`patch_rows * row_len` floats, row-major), with
/// per-channel `mean` and `std` (already divided by the rescale factor).
pub fn write_patches(
    image: &ImageU8<'_>,
    mean: &[f32],
    std: &[f32],
    s: &PatchSettings,
    out: &mut [f32],
) -> Result<()> {
    image.check("image")?;
    let rows = patch_rows(image.height, image.width, s)?;
    let c = image.channels;
    if mean.len() != c || std.len() != c {
        return Err(value_err!(
            "mean and std must have one value per channel ({c}), got {} and {}",
            mean.len(),
            std.len()
        ));
    }
    let row_len = s.row_len(c);
    if out.len() != rows * row_len {
        return Err(value_err!(
            "out has {} elements, expected {rows} * {row_len}",
            out.len()
        ));
    }
    let (p, m, t) = (s.patch_size, s.merge_size, s.temporal_patch_size);
    let merged_w = image.width / (p * m);
    let frame = p * p;
    // A uint8 channel has 256 values: normalize each once, with the processor's f32 operations
    // in its order ((x - mean) / std), and gather (bit for bit its values, without a division
    // per pixel).
    let lut: Vec<[f32; 256]> = (0..c)
        .map(|ch| std::array::from_fn(|v| (v as f32 - mean[ch]) / std[ch]))
        .collect();
    let [s0, s1, s2] = image.strides;
    // Enough rows per task to amortise scheduling (a row is a few KB).
    out.par_chunks_mut(row_len)
        .with_min_len(64)
        .enumerate()
        .for_each(|(r, row)| {
            // Row order of the processor's permute: (block row, block column, row in block, column in block).
            let mw = r % m;
            let mh = (r / m) % m;
            let block = r / (m * m);
            let (bh, bw) = (block / merged_w, block % merged_w);
            let y0 = (bh * m + mh) * p;
            let x0 = (bw * m + mw) * p;
            for (ch, table) in lut.iter().enumerate() {
                let base = ch * t * frame;
                let first = &mut row[base..base + frame];
                for py in 0..p {
                    let start = ch * s0 + (y0 + py) * s1 + x0 * s2;
                    let dst = &mut first[py * p..(py + 1) * p];
                    if s2 == 1 {
                        for (d, &v) in dst.iter_mut().zip(&image.data[start..start + p]) {
                            *d = table[v as usize];
                        }
                    } else if s2 == 0 {
                        dst.fill(table[image.data[start] as usize]); // a broadcast axis
                    } else {
                        let line = &image.data[start..start + (p - 1) * s2 + 1];
                        for (d, &v) in dst.iter_mut().zip(line.iter().step_by(s2)) {
                            *d = table[v as usize];
                        }
                    }
                }
                // An image is one frame repeated to the temporal patch size.
                for k in 1..t {
                    row.copy_within(base..base + frame, base + k * frame);
                }
            }
        });
    Ok(())
}

/// The patches of several images, one after the other, into `out` (the sum of their
/// `patch_rows * row_len` floats). An image given again (the same memory, shape and strides, as
/// a DVR sample's re-affirmed copy at each of its insertion points) is normalized once and
/// copied after that.
pub fn write_patches_many(
    images: &[ImageU8<'_>],
    mean: &[f32],
    std: &[f32],
    s: &PatchSettings,
    out: &mut [f32],
) -> Result<()> {
    let row_len = s.row_len(mean.len());
    let mut sizes = Vec::with_capacity(images.len());
    for image in images {
        sizes.push(patch_rows(image.height, image.width, s)? * row_len);
    }
    let total: usize = sizes.iter().sum();
    if out.len() != total {
        return Err(value_err!(
            "out has {} elements, expected {total}",
            out.len()
        ));
    }
    let same = |a: &ImageU8<'_>, b: &ImageU8<'_>| {
        std::ptr::eq(a.data.as_ptr(), b.data.as_ptr())
            && a.data.len() == b.data.len()
            && (a.channels, a.height, a.width, a.strides)
                == (b.channels, b.height, b.width, b.strides)
    };
    let mut start = 0;
    for (i, (image, &size)) in images.iter().zip(&sizes).enumerate() {
        let earlier = (0..i).find(|&j| same(&images[j], image));
        match earlier {
            Some(j) => {
                let from: usize = sizes[..j].iter().sum();
                out.copy_within(from..from + size, start);
            }
            None => write_patches(image, mean, std, s, &mut out[start..start + size])?,
        }
        start += size;
    }
    Ok(())
}
