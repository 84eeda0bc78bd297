//! Bindings of `crate::dvr`: `DVRPolicy`, `DVRBuilder` (insertion points, samples),
//! `Insertion`, `DVRPlan`, `DVRSample`, `DVRImage`, and the helpers of the LLaMA-Factory
//! plugin: `dvr_downscaled_size`, `infer_seqlen`, `vision_blocks`, `answer_cut`, `qwen2_vl_patches`.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use super::errors::type_name;
use pyo3::types::{PyList, PyString};
use rayon::prelude::*;

use super::tensor::{int_vector_arg, numpy_array, uint8_array};
use super::triggers::{detector_from, phrases_arg, Hit, ReflectionDetector};
use crate::dvr::{
    self, ChatFormat, ImageU8, Insertion as CoreInsertion, PatchSettings, Policy, Sample,
    SampleBuilder, VisionTokens,
};
use crate::rope::{ImageSettings, ModelType};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DVRPolicy>()?;
    m.add_class::<DVRBuilder>()?;
    m.add_class::<Insertion>()?;
    m.add_class::<DVRPlan>()?;
    m.add_class::<DVRImage>()?;
    m.add_class::<DVRSample>()?;
    m.add_function(wrap_pyfunction!(dvr_downscaled_size, m)?)?;
    m.add_function(wrap_pyfunction!(infer_seqlen, m)?)?;
    m.add_function(wrap_pyfunction!(vision_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(answer_cut, m)?)?;
    m.add_function(wrap_pyfunction!(qwen2_vl_patches, m)?)?;
    m.add_function(wrap_pyfunction!(dvr_family, m)?)?;
    m.add("IGNORE_INDEX", dvr::IGNORE_INDEX)?;
    m.add("QWEN2_VL_SYSTEM", dvr::QWEN2_VL_SYSTEM)?;
    Ok(())
}

fn non_negative(name: &str, value: i64) -> PyResult<usize> {
    if value < 0 {
        return Err(PyValueError::new_err(format!(
            "{name} = {value}: must be >= 0"
        )));
    }
    Ok(value as usize)
}

/// What DVR reads from a model family (`model_type`): `llamafactory_template` (the LLaMA-Factory
/// 0.9.5 template whose text its samples follow), `vision_tokens` (the names of the block's
/// start, end, image pad and video pad tokens), the released processor's `patch_size`,
/// `merge_size`, `min_pixels`, `max_pixels`, and `eos_token` (the token of an `efficient_eos`
/// template, else None). ValueError listing the supported types for any other.
#[pyfunction]
#[pyo3(text_signature = "(model_type)")]
fn dvr_family<'py>(
    py: Python<'py>,
    model_type: Arg<String>,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let model_type = ModelType::parse(&model_type.get("model_type")?)?;
    let images = ImageSettings::for_model(model_type);
    let format = ChatFormat::for_model(model_type, None, None);
    let out = pyo3::types::PyDict::new(py);
    out.set_item("model_type", model_type.name())?;
    out.set_item(
        "llamafactory_template",
        dvr::llamafactory_template(model_type),
    )?;
    out.set_item(
        "vision_tokens",
        dvr::vision_token_names(model_type).to_vec(),
    )?;
    out.set_item("patch_size", images.patch_size)?;
    out.set_item("merge_size", images.merge_size)?;
    out.set_item("min_pixels", images.min_pixels)?;
    out.set_item("max_pixels", images.max_pixels)?;
    out.set_item("eos_token", format.eos_token)?;
    Ok(out)
}

/// Where re-affirmed images go: after the sentence of a reflection phrase, at most
/// `max_insertions` per answer (None: no limit), `min_gap` answer tokens apart, not before
/// `skip_first` answer tokens; `bridge` is put right before each image; the copy is the image
/// with each side divided by `downscale` (rounded up); `placeholder` stands for an image in text.
#[pyclass(name = "DVRPolicy", module = "tvc_rs", frozen, eq, from_py_object)]
#[derive(Clone, PartialEq)]
pub struct DVRPolicy {
    pub inner: Policy,
}

#[pymethods]
impl DVRPolicy {
    #[new]
    #[pyo3(signature = (max_insertions = Some(Arg::of(4)), min_gap = Arg::of(200), skip_first = Arg::of(50), bridge = None, downscale = Arg::of(4), placeholder = Arg::of("<image>".to_string())), text_signature = "(max_insertions=4, min_gap=200, skip_first=50, bridge=None, downscale=4, placeholder='<image>')")]
    fn new(
        max_insertions: Option<Arg<i64>>,
        min_gap: Arg<i64>,
        skip_first: Arg<i64>,
        bridge: Option<Arg<String>>,
        downscale: Arg<i64>,
        placeholder: Arg<String>,
    ) -> PyResult<Self> {
        let max_insertions = opt_arg(max_insertions, "max_insertions")?;
        let min_gap = min_gap.get("min_gap")?;
        let skip_first = skip_first.get("skip_first")?;
        let bridge = opt_arg(bridge, "bridge")?;
        let downscale = downscale.get("downscale")?;
        let placeholder = placeholder.get("placeholder")?;
        let max_insertions = match max_insertions {
            None => None,
            Some(m) => Some(non_negative("max_insertions", m)?),
        };
        if !(1..=u32::MAX as i64).contains(&downscale) {
            return Err(PyValueError::new_err(format!(
                "downscale = {downscale}: must be >= 1"
            )));
        }
        let inner = Policy {
            max_insertions,
            min_gap: non_negative("min_gap", min_gap)?,
            skip_first: non_negative("skip_first", skip_first)?,
            bridge,
            downscale: downscale as u32,
            placeholder,
        };
        inner.check()?;
        Ok(DVRPolicy { inner })
    }

    #[getter]
    fn max_insertions(&self) -> Option<usize> {
        self.inner.max_insertions
    }
    #[getter]
    fn min_gap(&self) -> usize {
        self.inner.min_gap
    }
    #[getter]
    fn skip_first(&self) -> usize {
        self.inner.skip_first
    }
    #[getter]
    fn bridge(&self) -> Option<String> {
        self.inner.bridge.clone()
    }
    #[getter]
    fn downscale(&self) -> u32 {
        self.inner.downscale
    }
    #[getter]
    fn placeholder(&self) -> String {
        self.inner.placeholder.clone()
    }

    /// The text put at one insertion point for `images` images (bridge, then placeholders).
    #[pyo3(signature = (images = Arg::of(1)), text_signature = "($self, images=1)")]
    fn insertion_text(&self, images: Arg<usize>) -> PyResult<String> {
        Ok(self.inner.checked_insertion_text(images.get("images")?)?)
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        format!(
            "DVRPolicy(max_insertions={}, min_gap={}, skip_first={}, bridge={}, downscale={}, placeholder={:?})",
            p.max_insertions.map_or("None".to_string(), |m| m.to_string()),
            p.min_gap,
            p.skip_first,
            p.bridge.as_ref().map_or("None".to_string(), |b| format!("{b:?}")),
            p.downscale,
            p.placeholder
        )
    }
}

crate::pyclass_arg_value!(DVRPolicy, "DVRPolicy");

/// An insertion point: the re-affirmed image goes before character `char_index` of the answer
/// (a `str` index), after `token_index` answer tokens; `hit` is the reflection phrase whose
/// sentence ends there.
#[pyclass(name = "Insertion", module = "tvc_rs", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct Insertion {
    #[pyo3(get)]
    char_index: usize,
    #[pyo3(get)]
    token_index: usize,
    #[pyo3(get)]
    hit: Hit,
}

impl Insertion {
    fn new(ins: &CoreInsertion, phrases: &[String]) -> Self {
        Insertion {
            char_index: ins.char_index,
            token_index: ins.token_index,
            hit: Hit::new(&ins.hit, phrases),
        }
    }
}

#[pymethods]
impl Insertion {
    #[getter]
    fn phrase(&self) -> String {
        self.hit.phrase.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "Insertion(char_index={}, token_index={}, phrase={:?})",
            self.char_index, self.token_index, self.hit.phrase
        )
    }
}

/// What the policy makes of one answer (`DVRBuilder.plan_many`): the insertion points, the
/// answer with bridge and placeholders inserted, or the error that stopped it.
#[pyclass(name = "DVRPlan", module = "tvc_rs", frozen)]
pub struct DVRPlan {
    #[pyo3(get)]
    insertions: Vec<Insertion>,
    #[pyo3(get)]
    answer_text: Option<String>,
    #[pyo3(get)]
    error: Option<String>,
}

#[pymethods]
impl DVRPlan {
    fn __repr__(&self) -> String {
        match &self.error {
            Some(e) => format!("DVRPlan(error={e:?})"),
            None => format!("DVRPlan(insertions={})", self.insertions.len()),
        }
    }
}

/// One image of a sample: which question image it shows (`source`), whether it is a
/// re-affirmed copy inside the answer (`inserted`), the size handed to the processor and its
/// `grid_thw`.
#[pyclass(name = "DVRImage", module = "tvc_rs", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct DVRImage {
    #[pyo3(get)]
    source: usize,
    #[pyo3(get)]
    inserted: bool,
    #[pyo3(get)]
    height: i64,
    #[pyo3(get)]
    width: i64,
    #[pyo3(get)]
    grid_thw: (i64, i64, i64),
}

#[pymethods]
impl DVRImage {
    fn __repr__(&self) -> String {
        format!(
            "DVRImage(source={}, inserted={}, height={}, width={}, grid_thw={:?})",
            self.source,
            if self.inserted { "True" } else { "False" },
            self.height,
            self.width,
            self.grid_thw
        )
    }
}

/// A built DVR sample (`DVRBuilder.build`). Arrays are NumPy int64: `input_ids` and `labels`
/// `(n,)`, `position_ids` `(3, n)`, `image_grid_thw` `(images, 3)`.
#[pyclass(name = "DVRSample", module = "tvc_rs", frozen)]
pub struct DVRSample {
    #[pyo3(get)]
    answer_text: String,
    #[pyo3(get)]
    insertions: Vec<Insertion>,
    #[pyo3(get)]
    kept_images: usize,
    #[pyo3(get)]
    planned_images: usize,
    #[pyo3(get)]
    input_ids: Py<PyAny>,
    #[pyo3(get)]
    labels: Py<PyAny>,
    #[pyo3(get)]
    position_ids: Py<PyAny>,
    #[pyo3(get)]
    rope_delta: i64,
    #[pyo3(get)]
    images: Vec<DVRImage>,
    #[pyo3(get)]
    image_grid_thw: Py<PyAny>,
    #[pyo3(get)]
    prompt_tokens: usize,
    #[pyo3(get)]
    cut_tokens: usize,
}

#[pymethods]
impl DVRSample {
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.input_ids.bind(py).len()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "DVRSample(tokens={}, images={}, kept_images={}/{}, cut_tokens={})",
            self.input_ids.bind(py).len()?,
            self.images.len(),
            self.kept_images,
            self.planned_images,
            self.cut_tokens
        ))
    }
}

fn sample_to_py(py: Python<'_>, s: Sample, phrases: &[String]) -> PyResult<DVRSample> {
    let n = s.input_ids.len();
    let ids: Vec<i64> = s.input_ids.iter().map(|&i| i as i64).collect();
    let mut positions = Vec::with_capacity(3 * n);
    positions.extend_from_slice(&s.positions.t);
    positions.extend_from_slice(&s.positions.h);
    positions.extend_from_slice(&s.positions.w);
    let grids: Vec<i64> = s
        .images
        .iter()
        .flat_map(|im| [im.grid.t, im.grid.h, im.grid.w])
        .collect();
    let k = s.images.len();
    Ok(DVRSample {
        answer_text: s.answer_text,
        insertions: s
            .insertions
            .iter()
            .map(|i| Insertion::new(i, phrases))
            .collect(),
        kept_images: s.kept_images,
        planned_images: s.planned_images,
        input_ids: numpy_array(py, ids, vec![n])?.unbind(),
        labels: numpy_array(py, s.labels, vec![n])?.unbind(),
        position_ids: numpy_array(py, positions, vec![3, n])?.unbind(),
        rope_delta: s.positions.rope_delta,
        images: s
            .images
            .iter()
            .map(|im| DVRImage {
                source: im.source,
                inserted: im.inserted,
                height: im.height,
                width: im.width,
                grid_thw: (im.grid.t, im.grid.h, im.grid.w),
            })
            .collect(),
        image_grid_thw: numpy_array(py, grids, vec![k, 3])?.unbind(),
        prompt_tokens: s.prompt_tokens,
        cut_tokens: s.cut_tokens,
    })
}

/// Builds DVR samples: the reflection points of an answer, the insertions the policy makes of
/// them, and whole training samples (token ids, labels, M-RoPE positions).
///
/// tokenizer: a `ReflectionDetector` (its phrases are used), or a path to tokenizer.json / a
/// model folder, a `tokenizers.Tokenizer` or a transformers fast tokenizer (a detector with
/// `phrases` is made from it). The image settings are the processor's (`patch_size`,
/// `merge_size`, `min_pixels`, `max_pixels`; None: the family's released processor's);
/// `system` is the system prompt of the chat format ("" for none, None: the LLaMA-Factory
/// template's default); `model_type` is the family ("qwen2_vl", "qwen2_5_vl", "qwen3_vl",
/// "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen3_5", "qwen3_5_moe"): the chat format of its
/// LLaMA-Factory template, its vision tokens (by name, from the tokenizer) and position rule;
/// `eos_token`: the token `efficient_eos` templates (GLM) end a turn with (None: the family's).
#[pyclass(name = "DVRBuilder", module = "tvc_rs", frozen)]
pub struct DVRBuilder {
    inner: Arc<SampleBuilder>,
}

fn sizes_from(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(i64, i64)>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "image_sizes: expected a list of (height, width) pairs, got a string",
        ));
    }
    obj.extract::<Vec<(i64, i64)>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "image_sizes: expected a list of (height, width) integer pairs, got {}",
            type_name(obj)
        ))
    })
}

#[pymethods]
impl DVRBuilder {
    #[new]
    #[pyo3(signature = (tokenizer, *, phrases=None, policy=None, system=None, model_type = Arg::of("qwen2_vl".to_string()), patch_size=None, merge_size=None, min_pixels=None, max_pixels=None, eos_token=None), text_signature = "(tokenizer, *, phrases=None, policy=None, system=None, model_type='qwen2_vl', patch_size=None, merge_size=None, min_pixels=None, max_pixels=None, eos_token=None)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tokenizer: &Bound<'_, PyAny>,
        phrases: Option<&Bound<'_, PyAny>>,
        policy: Option<Arg<DVRPolicy>>,
        system: Option<Arg<String>>,
        model_type: Arg<String>,
        patch_size: Option<Arg<i64>>,
        merge_size: Option<Arg<i64>>,
        min_pixels: Option<Arg<i64>>,
        max_pixels: Option<Arg<i64>>,
        eos_token: Option<Arg<String>>,
    ) -> PyResult<Self> {
        let system = opt_arg(system, "system")?;
        let eos_token = opt_arg(eos_token, "eos_token")?;
        let policy = opt_arg(policy, "policy")?;
        let model_type = ModelType::parse(&model_type.get("model_type")?)?;
        // Every setting not given is the family's (its processor and LLaMA-Factory template).
        let family = ImageSettings::for_model(model_type);
        let patch_size = opt_arg(patch_size, "patch_size")?.unwrap_or(family.patch_size);
        let merge_size = opt_arg(merge_size, "merge_size")?.unwrap_or(family.merge_size);
        let min_pixels = opt_arg(min_pixels, "min_pixels")?.unwrap_or(family.min_pixels);
        let max_pixels = opt_arg(max_pixels, "max_pixels")?.unwrap_or(family.max_pixels);
        let phrases = phrases_arg(phrases)?;
        let detector = match tokenizer.cast::<ReflectionDetector>() {
            Ok(d) => {
                if phrases.is_some() {
                    return Err(PyValueError::new_err(
                        "phrases: a ReflectionDetector brings its own phrases; pass a tokenizer to choose them",
                    ));
                }
                d.get().inner.clone()
            }
            Err(_) => Arc::new(detector_from(py, tokenizer, phrases)?),
        };
        let images = ImageSettings {
            patch_size,
            merge_size,
            min_pixels,
            max_pixels,
            ..family
        };
        for (name, v) in [
            ("patch_size", patch_size),
            ("merge_size", merge_size),
            ("min_pixels", min_pixels),
            ("max_pixels", max_pixels),
        ] {
            if v < 1 {
                return Err(PyValueError::new_err(format!(
                    "{name} must be >= 1, got {v}"
                )));
            }
        }
        let builder = SampleBuilder::new(
            detector,
            policy.map(|p| p.inner).unwrap_or_default(),
            images,
            ChatFormat::for_model(model_type, system.as_deref(), eos_token.as_deref()),
            model_type,
        )?;
        Ok(DVRBuilder {
            inner: Arc::new(builder),
        })
    }

    #[getter]
    fn policy(&self) -> DVRPolicy {
        DVRPolicy {
            inner: self.inner.policy.clone(),
        }
    }

    #[getter]
    fn phrases(&self) -> Vec<String> {
        self.inner.detector.phrases().to_vec()
    }

    /// The model type (family) the samples are for.
    #[getter]
    fn model_type(&self) -> &'static str {
        self.inner.model_type.name()
    }

    /// The LLaMA-Factory 0.9.5 template whose text the samples follow (train with `tvc_` + it).
    #[getter]
    fn llamafactory_template(&self) -> &'static str {
        dvr::llamafactory_template(self.inner.model_type)
    }

    /// `(patch_size, merge_size, min_pixels, max_pixels)` in use.
    #[getter]
    fn image_settings(&self) -> (i64, i64, i64, i64) {
        let i = self.inner.images;
        (i.patch_size, i.merge_size, i.min_pixels, i.max_pixels)
    }

    /// `(vision_start, vision_end, image_pad, video_pad)` ids of the tokenizer.
    #[getter]
    fn vision_token_ids(&self) -> (i64, i64, i64, i64) {
        let v = self.inner.vision;
        (v.vision_start, v.vision_end, v.image_pad, v.video_pad)
    }

    /// The insertion points of `answer`, in order. ValueError if the answer already holds the
    /// placeholder.
    fn plan(&self, py: Python<'_>, answer: Arg<String>) -> PyResult<Vec<Insertion>> {
        let answer_owned = answer.get("answer")?;
        let answer: &str = &answer_owned;
        let plan = py.detach(|| self.inner.plan(answer))?;
        let phrases = self.inner.detector.phrases();
        Ok(plan.iter().map(|i| Insertion::new(i, phrases)).collect())
    }

    /// `plan` of many answers in parallel, with the answer text each insertion plan gives for
    /// `images[i]` question images (default 1 each). Errors are reported per answer
    /// (`DVRPlan.error`), not raised.
    #[pyo3(signature = (answers, images=None))]
    fn plan_many(
        &self,
        py: Python<'_>,
        answers: Arg<Vec<String>>,
        images: Option<Arg<Vec<usize>>>,
    ) -> PyResult<Vec<DVRPlan>> {
        let answers = answers.get("answers")?;
        let images = opt_arg(images, "images")?;
        let images = images.unwrap_or_else(|| vec![1; answers.len()]);
        for (i, &n) in images.iter().enumerate() {
            crate::dvr::policy::check_images(n)
                .map_err(|e| PyValueError::new_err(format!("images[{i}]: {e}")))?;
        }
        if images.len() != answers.len() {
            return Err(PyValueError::new_err(format!(
                "images has {} entries but answers has {}: one image count per answer",
                images.len(),
                answers.len()
            )));
        }
        let builder = &self.inner;
        let plans: Vec<_> = py.detach(|| {
            answers
                .par_iter()
                .zip(images.par_iter())
                .map(|(answer, &n)| {
                    builder.plan(answer).map(|p| {
                        let text = builder.insert(answer, &p, n);
                        (p, text)
                    })
                })
                .collect()
        });
        let phrases = builder.detector.phrases();
        Ok(plans
            .into_iter()
            .map(|r| match r {
                Ok((p, text)) => DVRPlan {
                    insertions: p.iter().map(|i| Insertion::new(i, phrases)).collect(),
                    answer_text: Some(text),
                    error: None,
                },
                Err(e) => DVRPlan {
                    insertions: Vec::new(),
                    answer_text: None,
                    error: Some(e.to_string()),
                },
            })
            .collect())
    }

    /// `answer` with the bridge and `images` placeholders put at each insertion point.
    #[pyo3(signature = (answer, insertions, images = Arg::of(1)), text_signature = "($self, answer, insertions, images=1)")]
    fn insert(
        &self,
        answer: Arg<String>,
        insertions: &Bound<'_, PyAny>,
        images: Arg<usize>,
    ) -> PyResult<String> {
        let answer_owned = answer.get("answer")?;
        let answer: &str = &answer_owned;
        let images = images.get("images")?;
        crate::dvr::policy::check_images(images)?;
        let insertions = insertions.cast::<PyList>().map_err(|_| {
            PyTypeError::new_err(format!(
                "insertions: expected a list of Insertion, got {}",
                type_name(insertions)
            ))
        })?;
        let n_chars = answer.chars().count();
        let mut points = Vec::with_capacity(insertions.len());
        for (i, item) in insertions.iter().enumerate() {
            let ins = item.cast::<Insertion>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "insertions[{i}]: expected an Insertion, got {}",
                    type_name(&item)
                ))
            })?;
            let at = ins.get().char_index;
            if at > n_chars {
                return Err(PyValueError::new_err(format!(
                    "insertions[{i}].char_index = {at} is past the end of the answer ({n_chars} characters)"
                )));
            }
            if points.last().is_some_and(|&p| at < p) {
                return Err(PyValueError::new_err(format!(
                    "insertions[{i}]: insertion points must be in increasing order"
                )));
            }
            points.push(at);
        }
        // Character offsets to byte offsets.
        let byte_of: Vec<usize> = answer
            .char_indices()
            .map(|(b, _)| b)
            .chain(std::iter::once(answer.len()))
            .collect();
        let core: Vec<CoreInsertion> = points
            .iter()
            .map(|&c| CoreInsertion {
                char_index: c,
                byte_index: byte_of[c],
                token_index: 0,
                hit: crate::triggers::Hit {
                    phrase: 0,
                    token_index: None,
                    char_start: 0,
                    char_end: 0,
                },
            })
            .collect();
        Ok(self.inner.insert(answer, &core, images))
    }

    /// The training sample of one long-CoT answer: `question` (one placeholder per image, or
    /// none: the images then come first), `image_sizes` `[(height, width), ...]` of the
    /// question's images, `answer`; with `cutoff`, at most that many tokens (cut as
    /// LLaMA-Factory's `infer_seqlen` cuts, never through an image block: every re-affirmed
    /// image wholly before the cut is kept, see `dvr::answer_cut`). ValueError for bad sizes, a placeholder count that is
    /// neither 0 nor the number of images, a placeholder inside the answer, a cutoff that would
    /// cut a question image in two.
    #[pyo3(signature = (question, image_sizes, answer, *, cutoff=None))]
    fn build(
        &self,
        py: Python<'_>,
        question: Arg<String>,
        image_sizes: &Bound<'_, PyAny>,
        answer: Arg<String>,
        cutoff: Option<Arg<i64>>,
    ) -> PyResult<DVRSample> {
        let question_owned = question.get("question")?;
        let question: &str = &question_owned;
        let answer_owned = answer.get("answer")?;
        let answer: &str = &answer_owned;
        let cutoff = opt_arg(cutoff, "cutoff")?;
        let sizes = sizes_from(image_sizes)?;
        let cutoff = match cutoff {
            None => None,
            Some(c) if c >= 1 => Some(c as usize),
            Some(c) => {
                return Err(PyValueError::new_err(format!(
                    "cutoff = {c}: must be >= 1 (or None)"
                )))
            }
        };
        let sample = py.detach(|| self.inner.build(question, &sizes, answer, cutoff))?;
        sample_to_py(py, sample, self.inner.detector.phrases())
    }

    /// Size of the re-affirmed copy of a `height x width` image under this builder's policy.
    fn downscaled_size(&self, height: Arg<i64>, width: Arg<i64>) -> PyResult<(i64, i64)> {
        let height = height.get("height")?;
        let width = width.get("width")?;
        Ok(dvr::downscaled_size(
            height,
            width,
            self.inner.policy.downscale,
        )?)
    }
}

/// `(ceil(height / factor), ceil(width / factor))`: the size of a re-affirmed copy (what
/// Pillow's `Image.reduce(factor)` gives).
#[pyfunction]
#[pyo3(signature = (height, width, factor = Arg::of(4)), text_signature = "(height, width, factor=4)")]
fn dvr_downscaled_size(
    height: Arg<i64>,
    width: Arg<i64>,
    factor: Arg<i64>,
) -> PyResult<(i64, i64)> {
    let height = height.get("height")?;
    let width = width.get("width")?;
    let factor = factor.get("factor")?;
    if !(1..=u32::MAX as i64).contains(&factor) {
        return Err(PyValueError::new_err(format!(
            "factor = {factor}: must be >= 1"
        )));
    }
    Ok(dvr::downscaled_size(height, width, factor as u32)?)
}

/// LLaMA-Factory's `infer_seqlen(source_len, target_len, cutoff_len)`: how many prompt and
/// answer tokens a turn keeps.
#[pyfunction]
fn infer_seqlen(
    source_len: Arg<i64>,
    target_len: Arg<i64>,
    cutoff: Arg<i64>,
) -> PyResult<(usize, usize)> {
    let source_len = source_len.get("source_len")?;
    let target_len = target_len.get("target_len")?;
    let cutoff = cutoff.get("cutoff")?;
    Ok(dvr::infer_seqlen(
        non_negative("source_len", source_len)?,
        non_negative("target_len", target_len)?,
        non_negative("cutoff", cutoff)?,
    ))
}

/// The vision blocks of a 1-D token sequence: an int64 array `(blocks, 6)` with columns
/// `start, end, pads_start, pads_end, video, complete` (`end` exclusive; `complete` 1 when both
/// the `<|vision_start|>` and the `<|vision_end|>` are there).
#[pyfunction]
#[pyo3(signature = (input_ids, *, vision_start = Arg::of(151652), vision_end = Arg::of(151653), image_pad = Arg::of(151655), video_pad = Arg::of(151656)), text_signature = "(input_ids, *, vision_start=151652, vision_end=151653, image_pad=151655, video_pad=151656)")]
fn vision_blocks<'py>(
    py: Python<'py>,
    input_ids: &Bound<'py, PyAny>,
    vision_start: Arg<i64>,
    vision_end: Arg<i64>,
    image_pad: Arg<i64>,
    video_pad: Arg<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let vision_start = vision_start.get("vision_start")?;
    let vision_end = vision_end.get("vision_end")?;
    let image_pad = image_pad.get("image_pad")?;
    let video_pad = video_pad.get("video_pad")?;
    let ids = int_vector_arg(input_ids, "input_ids")?;
    let tokens = VisionTokens {
        vision_start,
        vision_end,
        image_pad,
        video_pad,
    };
    let blocks = py.detach(|| dvr::vision_blocks(&ids, &tokens));
    let flat: Vec<i64> = blocks
        .iter()
        .flat_map(|b| {
            [
                b.start as i64,
                b.end as i64,
                b.pads_start as i64,
                b.pads_end as i64,
                b.video as i64,
                b.complete as i64,
            ]
        })
        .collect();
    numpy_array(py, flat, vec![blocks.len(), 6])
}

/// How many tokens of an answer `input_ids` are kept under a cut after `keep` tokens without
/// cutting an image block: a cut inside a block, or inside the `bridge` token ids right before
/// it, moves to its start (`tvc_rs.dvr.answer_cut`; Rust: `dvr::answer_cut`).
#[pyfunction]
#[pyo3(signature = (input_ids, keep, *, bridge=None, vision_start=151652, vision_end=151653, image_pad=151655, video_pad=151656))]
#[allow(clippy::too_many_arguments)]
fn answer_cut(
    py: Python<'_>,
    input_ids: &Bound<'_, PyAny>,
    keep: i64,
    bridge: Option<&Bound<'_, PyAny>>,
    vision_start: i64,
    vision_end: i64,
    image_pad: i64,
    video_pad: i64,
) -> PyResult<usize> {
    let ids = int_vector_arg(input_ids, "input_ids")?;
    let keep = non_negative("keep", keep)?;
    let bridge = match bridge {
        Some(b) => int_vector_arg(b, "bridge")?,
        None => Vec::new(),
    };
    let tokens = VisionTokens {
        vision_start,
        vision_end,
        image_pad,
        video_pad,
    };
    Ok(py.detach(|| dvr::answer_cut(&ids, keep, &tokens, &bridge)))
}

/// Qwen2-VL's `pixel_values` of resized `uint8` images in one pass: `(x - mean) / std` in
/// float32 per channel, repeated to `temporal_patch_size` frames and cut into merge-ordered
/// patches, as `Qwen2VLImageProcessor._preprocess` does after resizing.
///
/// images: 3-D uint8 arrays (NumPy or torch CPU, read through DLPack), `(channels, height, width)` (`layout="chw"`) or
/// `(height, width, channels)` (`layout="hwc"`), any non-negative strides; both sides
/// multiples of `patch_size * merge_size`. mean, std: one float per channel, already divided by
/// the rescale factor (the processor's fused values). Returns float32
/// `(sum of patch rows, channels * temporal_patch_size * patch_size**2)`, images in order.
#[pyfunction]
#[pyo3(signature = (images, mean, std, *, layout = Arg::of("chw".to_string()), patch_size = Arg::of(14), merge_size = Arg::of(2), temporal_patch_size = Arg::of(2)), text_signature = "(images, mean, std, *, layout='chw', patch_size=14, merge_size=2, temporal_patch_size=2)")]
#[allow(clippy::too_many_arguments)]
fn qwen2_vl_patches<'py>(
    py: Python<'py>,
    images: &Bound<'py, PyAny>,
    mean: Arg<Vec<f32>>,
    std: Arg<Vec<f32>>,
    layout: Arg<String>,
    patch_size: Arg<i64>,
    merge_size: Arg<i64>,
    temporal_patch_size: Arg<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let layout_owned = layout.get("layout")?;
    let layout: &str = &layout_owned;
    let patch_size = patch_size.get("patch_size")?;
    let merge_size = merge_size.get("merge_size")?;
    let temporal_patch_size = temporal_patch_size.get("temporal_patch_size")?;
    let mean = mean.get("mean")?;
    let std = std.get("std")?;
    let images = images.cast::<PyList>().map_err(|_| {
        PyTypeError::new_err(format!(
            "images: expected a list of uint8 arrays (NumPy or torch), got {}",
            type_name(images)
        ))
    })?;
    let hwc = match layout {
        "chw" => false,
        "hwc" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "layout must be 'chw' or 'hwc', got {other:?}"
            )))
        }
    };
    let settings = PatchSettings {
        patch_size: non_negative("patch_size", patch_size)?,
        merge_size: non_negative("merge_size", merge_size)?,
        temporal_patch_size: non_negative("temporal_patch_size", temporal_patch_size)?,
    };
    settings.check()?;
    if let Some(bad) = std.iter().position(|&s| s == 0.0 || !s.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "std[{bad}] = {}: must be finite and non-zero",
            std[bad]
        )));
    }

    // Check every image and find its memory before anything is written.
    let mut arrays = Vec::with_capacity(images.len());
    for (i, item) in images.iter().enumerate() {
        let array = uint8_array(&item, &format!("images[{i}]"))?;
        if array.shape.len() != 3 {
            return Err(PyValueError::new_err(format!(
                "images[{i}]: expected 3 dimensions ({}), got {}",
                if hwc {
                    "height, width, channels"
                } else {
                    "channels, height, width"
                },
                array.shape.len()
            )));
        }
        arrays.push(array);
    }
    let mut views = Vec::with_capacity(arrays.len());
    let mut rows = Vec::with_capacity(arrays.len());
    for (i, array) in arrays.iter().enumerate() {
        let data = array.bytes().ok_or_else(|| {
            PyValueError::new_err(format!(
                "images[{i}]: negative strides are not supported (use numpy.ascontiguousarray)"
            ))
        })?;
        let shape = &array.shape;
        let strides: Vec<usize> = array.strides.iter().map(|&s| s as usize).collect();
        let (c, h, w, st) = if hwc {
            (
                shape[2],
                shape[0],
                shape[1],
                [strides[2], strides[0], strides[1]],
            )
        } else {
            (
                shape[0],
                shape[1],
                shape[2],
                [strides[0], strides[1], strides[2]],
            )
        };
        if c != mean.len() || c != std.len() {
            return Err(PyValueError::new_err(format!(
                "images[{i}] has {c} channels but mean and std have {} and {} values",
                mean.len(),
                std.len()
            )));
        }
        let image = ImageU8 {
            data,
            channels: c,
            height: h,
            width: w,
            strides: st,
        };
        image.check(&format!("images[{i}]"))?;
        rows.push(
            dvr::patch_rows(h, w, &settings)
                .map_err(|e| PyValueError::new_err(format!("images[{i}]: {e}")))?,
        );
        views.push(image);
    }
    let row_len = settings.row_len(mean.len());
    let total: usize = rows.iter().sum();
    let too_large = || {
        pyo3::exceptions::PyMemoryError::new_err(format!(
            "images: the output ({total}, {row_len}) float32 cannot be allocated"
        ))
    };
    let len = total.checked_mul(row_len).ok_or_else(too_large)?;
    let mut out: Vec<f32> = Vec::new();
    out.try_reserve_exact(len).map_err(|_| too_large())?;
    out.resize(len, 0.0);
    py.detach(|| dvr::write_patches_many(&views, &mean, &std, &settings, &mut out))?;
    numpy_array(py, out, vec![total, row_len])
}
