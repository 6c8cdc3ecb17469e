//! The model stage: the ONNX fraud model written by `models/train.py`, scored with ONNX Runtime
//! (`ort`, library loaded at run time) on every micro-batch, straight from the Arrow feature
//! columns.
//!
//! Contract of the ONNX file (what `models/train.py` writes):
//! - one input `features`, float32 `[N, F]`, the features in the order of `payguard.features`,
//!   NULL as NaN;
//! - one output `score`, float32 `[N]` or `[N, 1]`: the calibrated fraud probability;
//! - metadata_props `payguard.features` (JSON list of names), `payguard.feature_types` (JSON list:
//!   `float64`, `int64`, ... as `features.sql` yields them), `payguard.model_version`,
//!   `payguard.label_column`, `payguard.thresholds`, `payguard.training_window`,
//!   `payguard.metrics`, `payguard.baseline` (one reference value per feature, for explanations);
//!   `payguard.categories` (JSON object: for each `category` feature, a text column of
//!   `features.sql`, its values in code order; the tensor holds a value's code, NaN for NULL or
//!   an unseen value).
//!
//! The session is created once per model file ([`Model::load`]); [`Model::bind`] checks the
//! declared features against the feature schema of `features.sql` (name, type, order) and fixes
//! which columns feed the tensor. [`Model::explain`] gives an alert's top contributing features by
//! occlusion: each feature in turn replaced by its baseline value, contribution = score - score
//! with the feature occluded.

pub mod tensor;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use crate::config::{Config, ModelConfig};

/// Errors of the model stage.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The ONNX Runtime shared library could not be loaded.
    #[error(
        "cannot load the ONNX Runtime library: {reason} (install it with `bash .ci/onnxruntime.sh`, or set ORT_DYLIB_PATH or model.ort_library)"
    )]
    Library {
        /// What was tried and what failed.
        reason: String,
    },
    /// The model file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The model file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// ONNX Runtime refused the file (corrupt, not ONNX, unsupported operator...).
    #[error("{path}: not a usable ONNX model: {source}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: ort::Error,
    },
    /// The file breaks the model contract (inputs, outputs, metadata).
    #[error("{path}: {message}")]
    Contract {
        /// The model file.
        path: PathBuf,
        /// Every problem found.
        message: String,
    },
    /// The model's features do not match what `features.sql` yields.
    #[error("{path}: the model's features do not match {features}: {message}")]
    Features {
        /// The model file.
        path: PathBuf,
        /// The feature SQL file.
        features: PathBuf,
        /// Every mismatch, naming the columns.
        message: String,
    },
    /// Building the input tensor failed.
    #[error("{path}: {message}")]
    Tensor {
        /// The model file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// ONNX Runtime failed scoring a batch.
    #[error("{path}: scoring failed: {source}")]
    Run {
        /// The model file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: ort::Error,
    },
}

/// What a model file declares in its `payguard.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMeta {
    /// Feature names, in input order.
    pub features: Vec<String>,
    /// Their types as `features.sql` yields them (`float64`, `int64`, ...).
    pub feature_types: Vec<String>,
    /// Version, stored with every scored transaction.
    pub version: String,
    /// Label column trained on.
    pub label_column: String,
    /// Review and decline thresholds chosen at training, if declared.
    pub thresholds: Option<(f64, f64)>,
    /// Training window (JSON, as declared).
    pub training_window: String,
    /// Held-out metrics (JSON, as declared).
    pub metrics: String,
    /// Per-feature reference values used for explanations.
    pub baseline: Vec<f32>,
    /// Per feature, in input order: the vocabulary of a `category` feature, else `None`.
    pub categories: Vec<Option<tensor::Vocabulary>>,
}

/// A loaded model: one ONNX Runtime session, created once.
pub struct Model {
    session: Session,
    meta: ModelMeta,
    path: PathBuf,
    /// Column indexes in the feature batch, in the model's order (set by [`Model::bind`]).
    columns: Vec<usize>,
    /// Reused tensor buffer.
    buf: Vec<f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("version", &self.meta.version)
            .field("features", &self.meta.features.len())
            .finish()
    }
}

/// One feature's share of an alert's score.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Contribution {
    /// Feature name.
    pub feature: String,
    /// Its value in the transaction (NULL, or a category the model did not see, as `null`; a
    /// category as its text).
    pub value: serde_json::Value,
    /// The baseline it was replaced by (a category as its text).
    pub baseline: serde_json::Value,
    /// score - score with the feature at its baseline.
    pub contribution: f64,
}

/// Every ONNX Runtime call scores a multiple of this many rows (zero rows appended). ONNX Runtime's
/// vectorised kernels compute the last `N mod 4` rows of a call on a scalar path whose results
/// differ in the last bit; padding makes a transaction's score independent of where the stream
/// was cut into micro-batches (16: room for 16-wide vectors).
pub const PAD_ROWS: usize = 16;

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Library files to try, in order: `model.ort_library`, `ORT_DYLIB_PATH`, the `.ci/onnxruntime.sh`
/// install under `$PAYGUARD_CACHE` or `~/.cache/payguard`, then the system's.
pub fn library_candidates(configured: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if !configured.as_os_str().is_empty() {
        out.push(configured.to_path_buf());
    }
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH")
        && !p.is_empty()
    {
        out.push(PathBuf::from(p));
    }
    let cache = std::env::var_os("PAYGUARD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/payguard")));
    if let Some(c) = cache {
        out.push(c.join("onnxruntime/lib/libonnxruntime.so"));
    }
    out.push(PathBuf::from("libonnxruntime.so"));
    out
}

/// `model.ort_library` resolved against the config's directory (empty stays empty: not set).
pub fn library_path(config: &Config, cfg: &ModelConfig) -> PathBuf {
    if cfg.ort_library.as_os_str().is_empty() {
        PathBuf::new()
    } else {
        config.resolve(&cfg.ort_library)
    }
}

/// The process's ONNX Runtime environment, loading the library on first use (once per process:
/// the first configured library wins).
pub fn environment(configured: &Path) -> Result<Environment, ModelError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let candidates = library_candidates(configured);
        let mut tried = Vec::new();
        for c in &candidates {
            // A bare name is left to the dynamic loader's search path; a path must exist.
            let bare = c.components().count() == 1;
            if !bare && !c.is_file() {
                tried.push(format!("{} (no such file)", c.display()));
                continue;
            }
            match ort::init_from(c) {
                Ok(builder) => {
                    return builder
                        .with_name("payguard")
                        .build()
                        .map_err(|e| format!("{}: {e}", c.display()));
                }
                Err(e) => tried.push(format!("{}: {e}", c.display())),
            }
        }
        Err(format!("tried {}", tried.join("; ")))
    });
    result
        .clone()
        .map_err(|reason| ModelError::Library { reason })
}

fn meta_json<T: serde::de::DeserializeOwned>(
    raw: Option<String>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    match raw {
        None => {
            problems.push(format!("metadata {key} is missing"));
            None
        }
        Some(s) => match serde_json::from_str(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(format!("metadata {key} is not the JSON expected: {e}"));
                None
            }
        },
    }
}

impl Model {
    /// Load the model of `cfg` (path resolved against the config) and create its session.
    pub fn load(config: &Config, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let path = config.resolve(&cfg.path);
        let env = environment(&library_path(config, cfg))?;
        if !path.is_file() {
            return Err(ModelError::Contract {
                path,
                message: "model file does not exist (train one with `make model`, or remove the [model] section to run on rules alone)".into(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let load = |source: ort::Error| ModelError::Load {
            path: path.clone(),
            source,
        };
        let session = Session::builder(&env)
            .map_err(load)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| load(e.into()))?
            .with_intra_threads(cfg.threads.max(1))
            .map_err(|e| load(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| load(e.into()))?
            .commit_from_memory(&bytes)
            .map_err(load)?;
        let meta = Self::read_meta(&session, &path)?;
        if meta.label_column != cfg.label_column {
            return Err(ModelError::Contract {
                path,
                message: format!(
                    "trained on label column {:?} but model.label_column is {:?}",
                    meta.label_column, cfg.label_column
                ),
            });
        }
        Ok(Self {
            session,
            meta,
            path,
            columns: Vec::new(),
            buf: Vec::new(),
        })
    }

    fn read_meta(session: &Session, path: &Path) -> Result<ModelMeta, ModelError> {
        let mut problems = Vec::new();
        let inputs = session.inputs();
        let outputs = session.outputs();
        let metadata = session.metadata().map_err(|source| ModelError::Load {
            path: path.to_path_buf(),
            source,
        })?;
        let get = |k: &str| metadata.custom(k);
        let features: Vec<String> =
            meta_json(get("payguard.features"), "payguard.features", &mut problems)
                .unwrap_or_default();
        let feature_types: Vec<String> = meta_json(
            get("payguard.feature_types"),
            "payguard.feature_types",
            &mut problems,
        )
        .unwrap_or_default();
        let baseline: Vec<f64> =
            meta_json(get("payguard.baseline"), "payguard.baseline", &mut problems)
                .unwrap_or_default();
        let vocabularies: std::collections::BTreeMap<String, Vec<String>> =
            match get("payguard.categories") {
                None => Default::default(),
                some => meta_json(some, "payguard.categories", &mut problems).unwrap_or_default(),
            };
        let mut categories: Vec<Option<tensor::Vocabulary>> = Vec::with_capacity(features.len());
        for (name, t) in features.iter().zip(&feature_types) {
            match (t.as_str(), vocabularies.get(name)) {
                ("category", Some(values)) => categories.push(Some(
                    values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (v.clone(), i as f32))
                        .collect(),
                )),
                ("category", None) => {
                    problems.push(format!(
                        "feature {name} is a category but payguard.categories has no values for it"
                    ));
                    categories.push(None);
                }
                (_, Some(_)) => {
                    problems.push(format!(
                        "payguard.categories has values for {name}, which is {t}, not a category"
                    ));
                    categories.push(None);
                }
                _ => categories.push(None),
            }
        }
        for name in vocabularies.keys() {
            if !features.contains(name) {
                problems.push(format!(
                    "payguard.categories has values for {name}, which is not a feature"
                ));
            }
        }
        let version = get("payguard.model_version").unwrap_or_else(|| {
            problems.push("metadata payguard.model_version is missing".into());
            String::new()
        });
        let label_column = get("payguard.label_column").unwrap_or_else(|| "label".into());
        let thresholds = get("payguard.thresholds")
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| Some((v["review"].as_f64()?, v["decline"].as_f64()?)));
        if feature_types.len() != features.len() {
            problems.push(format!(
                "payguard.feature_types has {} entries for {} features",
                feature_types.len(),
                features.len()
            ));
        }
        if baseline.len() != features.len() {
            problems.push(format!(
                "payguard.baseline has {} values for {} features",
                baseline.len(),
                features.len()
            ));
        }
        let described = |o: &ort::value::Outlet| format!("{} {:?}", o.name(), o.dtype());
        match inputs {
            [i] if i.name() == "features" => {
                let ok_type =
                    i.dtype().tensor_type() == Some(ort::value::TensorElementType::Float32);
                let shape = i.dtype().tensor_shape();
                let width = shape.and_then(|s| (s.len() == 2).then(|| s[1]));
                if !ok_type || width.is_none() {
                    problems.push(format!(
                        "input must be `features` float32 [N, F]; it is {}",
                        described(i)
                    ));
                } else if let Some(w) = width
                    && w >= 0
                    && w as usize != features.len()
                {
                    problems.push(format!(
                        "input `features` has {w} columns but payguard.features names {}",
                        features.len()
                    ));
                }
            }
            other => problems.push(format!(
                "must have one input named `features`; it has {}",
                other.iter().map(described).collect::<Vec<_>>().join(", ")
            )),
        }
        match outputs.iter().find(|o| o.name() == "score") {
            Some(o) if o.dtype().tensor_type() == Some(ort::value::TensorElementType::Float32) => {}
            Some(o) => problems.push(format!(
                "output `score` must be float32; it is {}",
                described(o)
            )),
            None => problems.push(format!(
                "must have an output named `score`; it has {}",
                outputs.iter().map(described).collect::<Vec<_>>().join(", ")
            )),
        }
        if !problems.is_empty() {
            return Err(ModelError::Contract {
                path: path.to_path_buf(),
                message: problems.join("; "),
            });
        }
        Ok(ModelMeta {
            features,
            feature_types,
            version,
            label_column,
            thresholds,
            training_window: get("payguard.training_window").unwrap_or_default(),
            metrics: get("payguard.metrics").unwrap_or_default(),
            baseline: baseline.into_iter().map(|v| v as f32).collect(),
            categories,
        })
    }

    /// What the file declares.
    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Check the declared features against the feature columns `features.sql` yields (`schema`,
    /// without `transaction_id`: the batch [`Model::score`] gets) and fix the tensor's columns. Every declared feature must be
    /// there, with the declared type, in the declared order; every problem is listed. Returns the
    /// feature columns the model does not use (allowed: a new feature needs a retrained model to
    /// be used).
    pub fn bind(
        &mut self,
        schema: &Schema,
        features_file: &Path,
    ) -> Result<Vec<String>, ModelError> {
        let mut problems = Vec::new();
        let mut columns = Vec::new();
        for (name, want) in self.meta.features.iter().zip(&self.meta.feature_types) {
            match schema.index_of(name) {
                Err(_) => problems.push(format!("feature {name} is not a column of it")),
                Ok(i) => {
                    let t = schema.field(i).data_type();
                    match tensor::type_name(t) {
                        Some(got) if got == want => columns.push(i),
                        Some(got) => problems.push(format!(
                            "feature {name} is {got} there, the model was trained on {want}"
                        )),
                        None => problems.push(format!(
                            "feature {name} is {t} there, which is not a number nor a text category (the model was trained on {want})"
                        )),
                    }
                }
            }
        }
        if problems.is_empty() && columns.windows(2).any(|w| w[0] > w[1]) {
            let mut theirs: Vec<(usize, &String)> =
                columns.iter().copied().zip(&self.meta.features).collect();
            theirs.sort();
            problems.push(format!(
                "feature order differs: the model takes {}; features.sql yields {}",
                self.meta.features.join(", "),
                theirs
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !problems.is_empty() {
            return Err(ModelError::Features {
                path: self.path.clone(),
                features: features_file.to_path_buf(),
                message: problems.join("; "),
            });
        }
        let unused = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !columns.contains(i))
            .map(|(_, f)| f.name().clone())
            .collect();
        self.columns = columns;
        Ok(unused)
    }

    /// One ONNX Runtime call on a row-major `[rows, F]` tensor whose row count is a multiple of
    /// [`PAD_ROWS`] (see there); returns the scores of the first `keep` rows.
    fn run(&mut self, data: &[f32], keep: usize) -> Result<Vec<f32>, ModelError> {
        let width = self.meta.features.len().max(1);
        let rows = data.len() / width;
        let run_err = |path: &Path, source| ModelError::Run {
            path: path.to_path_buf(),
            source,
        };
        let input = TensorRef::from_array_view(([rows, width], data))
            .map_err(|e| run_err(&self.path, e))?;
        let outputs = self
            .session
            .run(ort::inputs!["features" => input])
            .map_err(|e| run_err(&self.path, e))?;
        let (_, scores) = outputs["score"]
            .try_extract_tensor::<f32>()
            .map_err(|e| run_err(&self.path, e))?;
        if scores.len() != rows {
            return Err(ModelError::Tensor {
                path: self.path.clone(),
                message: format!("output `score` has {} values for {rows} rows", scores.len()),
            });
        }
        Ok(scores[..keep.min(rows)].to_vec())
    }

    /// Zero rows appended to `buf` (holding `rows` rows) up to a multiple of [`PAD_ROWS`].
    fn pad(&self, buf: &mut Vec<f32>, rows: usize) {
        let width = self.meta.features.len().max(1);
        let padded = rows.div_ceil(PAD_ROWS) * PAD_ROWS;
        buf.resize(padded * width, 0.0);
    }

    /// Score every row of a feature batch (the batch `features.sql` yields; [`Model::bind`] first).
    pub fn score(&mut self, features: &RecordBatch) -> Result<Vec<f32>, ModelError> {
        let n = features.num_rows();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = std::mem::take(&mut self.buf);
        let scored = tensor::build(features, &self.columns, &self.meta.categories, &mut buf)
            .map_err(|message| ModelError::Tensor {
                path: self.path.clone(),
                message,
            })
            .and_then(|()| {
                self.pad(&mut buf, n);
                self.run(&buf, n)
            });
        self.buf = buf;
        scored
    }

    /// Score a pre-built row-major `[rows, F]` tensor (padded like [`Model::score`]).
    pub fn score_tensor(&mut self, tensor: &[f32]) -> Result<Vec<f32>, ModelError> {
        let rows = tensor.len() / self.meta.features.len().max(1);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(tensor);
        self.pad(&mut buf, rows);
        let scored = self.run(&buf, rows);
        self.buf = buf;
        scored
    }

    /// The raw session call on a pre-built tensor, as it is (the benchmark's baseline: no Arrow
    /// conversion, no padding, no copy).
    pub fn score_raw(&mut self, tensor: &[f32]) -> Result<Vec<f32>, ModelError> {
        let rows = tensor.len() / self.meta.features.len().max(1);
        self.run(tensor, rows)
    }

    /// The `[rows, F]` tensor of a feature batch, as [`Model::score`] builds it.
    pub fn tensor(&self, features: &RecordBatch) -> Result<Vec<f32>, ModelError> {
        let mut out = Vec::new();
        tensor::build(features, &self.columns, &self.meta.categories, &mut out).map_err(
            |message| ModelError::Tensor {
                path: self.path.clone(),
                message,
            },
        )?;
        Ok(out)
    }

    /// Explanations of `rows` (indexes into `features`, whose scores are `scores`): for each, the
    /// `top` features with the largest |contribution|, contribution = score - score with the
    /// feature replaced by its `payguard.baseline` value. One ONNX call for all rows.
    pub fn explain(
        &mut self,
        features: &RecordBatch,
        rows: &[usize],
        scores: &[f32],
        top: usize,
    ) -> Result<Vec<Vec<Contribution>>, ModelError> {
        if rows.is_empty() || top == 0 {
            return Ok(vec![Vec::new(); rows.len()]);
        }
        let width = self.meta.features.len();
        let idx = datafusion::arrow::array::UInt32Array::from(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        );
        let picked =
            datafusion::arrow::compute::take_record_batch(features, &idx).map_err(|e| {
                ModelError::Tensor {
                    path: self.path.clone(),
                    message: e.to_string(),
                }
            })?;
        let mut own = Vec::new();
        tensor::build(&picked, &self.columns, &self.meta.categories, &mut own).map_err(
            |message| ModelError::Tensor {
                path: self.path.clone(),
                message,
            },
        )?;
        // Row r, feature j occluded: row r * width + j of the occlusion tensor.
        let mut occluded = Vec::with_capacity(rows.len() * width * width);
        for r in 0..rows.len() {
            let row = &own[r * width..(r + 1) * width];
            for j in 0..width {
                let start = occluded.len();
                occluded.extend_from_slice(row);
                occluded[start + j] = self.meta.baseline[j];
            }
        }
        let occ = self.score_tensor(&occluded)?;
        let meta = &self.meta;
        // A value as the explanation shows it: a category's text, a number tidied.
        let shown = |j: usize, v: f32| -> serde_json::Value {
            if v.is_nan() {
                return serde_json::Value::Null;
            }
            match meta.categories[j].as_ref() {
                Some(vocabulary) => vocabulary
                    .iter()
                    .find(|(_, code)| **code == v)
                    .map_or(serde_json::Value::Null, |(text, _)| text.clone().into()),
                None => serde_json::json!(tidy(v)),
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for (r, &row) in rows.iter().enumerate() {
            let mut c: Vec<Contribution> = (0..width)
                .map(|j| {
                    let v = own[r * width + j];
                    Contribution {
                        feature: self.meta.features[j].clone(),
                        value: shown(j, v),
                        baseline: shown(j, self.meta.baseline[j]),
                        contribution: tidy(scores[row] - occ[r * width + j]),
                    }
                })
                .collect();
            c.sort_by(|a, b| {
                b.contribution
                    .abs()
                    .total_cmp(&a.contribution.abs())
                    .then_with(|| a.feature.cmp(&b.feature))
            });
            c.truncate(top);
            out.push(c);
        }
        Ok(out)
    }
}

/// An f32 as the shortest f64 that prints the same (no float noise in the stored JSON).
fn tidy(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// Load and bind the configured model against the feature schema (the start and `check` path).
pub fn load_bound(config: &Config, feature_schema: &Schema) -> Result<Option<Model>, ModelError> {
    let Some(cfg) = &config.model else {
        return Ok(None);
    };
    let mut model = Model::load(config, cfg)?;
    let features_file = config.resolve(&config.engine.features);
    let unused = model.bind(feature_schema, &features_file)?;
    if !unused.is_empty() {
        tracing::warn!(model = %model.path.display(), unused = %unused.join(", "),
            "features.sql yields features the model does not use (retrain to use them)");
    }
    if let Some((r, d)) = model.meta.thresholds
        && (r != config.engine.review_threshold || d != config.engine.decline_threshold)
    {
        tracing::warn!(
            model_review = r,
            model_decline = d,
            engine_review = config.engine.review_threshold,
            engine_decline = config.engine.decline_threshold,
            "the model was evaluated at other thresholds than engine.review_threshold / decline_threshold, which decide"
        );
    }
    Ok(Some(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lib: &str) -> ModelConfig {
        ModelConfig {
            path: "models/m.onnx".into(),
            label_column: "label".into(),
            explain_top: 5,
            ort_library: lib.into(),
            threads: 1,
            hot_reload: true,
        }
    }

    #[test]
    fn the_library_is_looked_for_where_the_config_then_ci_install_then_system_put_it() {
        let config = Config {
            base_dir: PathBuf::from("/srv/payguard"),
            ..Default::default()
        };
        // Not set stays not set (not the config's directory).
        assert_eq!(library_path(&config, &cfg("")), PathBuf::new());
        assert_eq!(
            library_path(&config, &cfg("lib/libonnxruntime.so")),
            PathBuf::from("/srv/payguard/lib/libonnxruntime.so")
        );
        let c = library_candidates(Path::new("/opt/ort/libonnxruntime.so"));
        assert_eq!(c[0], PathBuf::from("/opt/ort/libonnxruntime.so"));
        assert!(
            c.iter()
                .any(|p| p.ends_with("onnxruntime/lib/libonnxruntime.so")
                    && p != Path::new("/opt/ort/libonnxruntime.so")),
            "{c:?}"
        );
        assert_eq!(c.last().unwrap(), Path::new("libonnxruntime.so"));
        assert!(!library_candidates(Path::new("")).contains(&PathBuf::new()));
    }

    #[test]
    fn tidy_drops_float_noise() {
        assert_eq!(tidy(1215.2504_f32), 1215.2504);
        assert_eq!(tidy(0.1_f32), 0.1);
    }
}
