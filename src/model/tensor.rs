//! The `[N, F]` float32 input tensor of the model, built straight from the Arrow feature columns.
//!
//! Row-major (`out[row * F + feature]`), features in the model's declared order. NULL becomes NaN,
//! which is what `models/train.py` feeds for a missing value too (LightGBM's missing value, taken
//! down the branch learned for missing values). Integers and booleans are converted to f32 (exact
//! up to 2^24, far beyond any count a window yields). A text feature is a category: its value's
//! index in the model's vocabulary (`payguard.categories`), NaN for NULL or a value the model did
//! not see in training (LightGBM's categorical split sends both the way it learned for missing).

use std::collections::HashMap;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array,
    RecordBatch,
};
use datafusion::arrow::datatypes::DataType;

/// A category feature's vocabulary: value -> the code the model was trained on.
pub type Vocabulary = HashMap<String, f32>;

/// The name a feature type has in `payguard.feature_types` (as `models/train.py` writes it), or
/// `None` for a type the model cannot take.
pub fn type_name(t: &DataType) -> Option<&'static str> {
    Some(match t {
        DataType::Float64 => "float64",
        DataType::Float32 => "float32",
        DataType::Int64 => "int64",
        DataType::Int32 => "int32",
        DataType::Boolean => "bool",
        DataType::Utf8 | DataType::Utf8View => "category",
        _ => return None,
    })
}

/// Write column `col` into slot `j` of every row of `out` (`width` values per row); a text
/// column through its `vocabulary`.
fn fill_column(
    col: &ArrayRef,
    vocabulary: Option<&Vocabulary>,
    j: usize,
    width: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let n = col.len();
    let code = |v: Option<&str>| {
        v.and_then(|v| vocabulary.and_then(|m| m.get(v)))
            .copied()
            .unwrap_or(f32::NAN)
    };
    macro_rules! fill {
        ($ty:ty, $conv:expr) => {{
            let a = col
                .as_any()
                .downcast_ref::<$ty>()
                .ok_or_else(|| format!("type {} did not downcast", col.data_type()))?;
            let conv = $conv;
            if a.null_count() == 0 {
                for (i, v) in a.values().iter().enumerate() {
                    out[i * width + j] = conv(*v);
                }
            } else {
                for i in 0..n {
                    out[i * width + j] = if a.is_null(i) {
                        f32::NAN
                    } else {
                        conv(a.value(i))
                    };
                }
            }
        }};
    }
    match col.data_type() {
        DataType::Float64 => fill!(Float64Array, |v: f64| v as f32),
        DataType::Float32 => fill!(Float32Array, |v: f32| v),
        DataType::Int64 => fill!(Int64Array, |v: i64| v as f32),
        DataType::Int32 => fill!(Int32Array, |v: i32| v as f32),
        DataType::Boolean => {
            let a = col
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or_else(|| "boolean did not downcast".to_string())?;
            for i in 0..n {
                out[i * width + j] = if a.is_null(i) {
                    f32::NAN
                } else if a.value(i) {
                    1.0
                } else {
                    0.0
                };
            }
        }
        DataType::Utf8 | DataType::Utf8View if vocabulary.is_none() => {
            return Err("a text feature needs the model's vocabulary (payguard.categories)".into());
        }
        DataType::Utf8 => {
            for (i, v) in col.as_string::<i32>().iter().enumerate() {
                out[i * width + j] = code(v);
            }
        }
        DataType::Utf8View => {
            for (i, v) in col.as_string_view().iter().enumerate() {
                out[i * width + j] = code(v);
            }
        }
        other => return Err(format!("type {other} cannot be a model input")),
    }
    Ok(())
}

/// Fill `out` with the `[rows, columns.len()]` tensor of `batch`'s columns `columns` (indexes, in
/// the model's order; `vocabularies[j]` for a category column `j`, else `None`). `out` is
/// resized; its allocation is reused between calls.
pub fn build(
    batch: &RecordBatch,
    columns: &[usize],
    vocabularies: &[Option<Vocabulary>],
    out: &mut Vec<f32>,
) -> Result<(), String> {
    let (n, width) = (batch.num_rows(), columns.len());
    out.clear();
    out.resize(n * width, 0.0);
    for (j, &c) in columns.iter().enumerate() {
        let col = batch.column(c);
        fill_column(
            col,
            vocabularies.get(j).and_then(Option::as_ref),
            j,
            width,
            out,
        )
        .map_err(|e| format!("column {}: {e}", batch.schema().field(c).name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    #[test]
    fn builds_a_row_major_tensor_in_model_order_with_nan_for_null() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a_count", DataType::Int64, true),
            Field::new("b_amount", DataType::Float64, true),
            Field::new("c_flag", DataType::Boolean, true),
            Field::new("d_small", DataType::Int32, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![Some(3), None, Some(7)])),
                Arc::new(Float64Array::from(vec![Some(1.5), Some(-2.25), None])),
                Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
                Arc::new(Int32Array::from(vec![10, 20, 30])),
            ],
        )
        .unwrap();
        let mut out = vec![99.0; 2];
        // The model's order differs from the batch's: b, d, a, c.
        build(&batch, &[1, 3, 0, 2], &[], &mut out).unwrap();
        let want = [
            [1.5, 10.0, 3.0, 1.0],
            [-2.25, 20.0, f32::NAN, 0.0],
            [f32::NAN, 30.0, 7.0, f32::NAN],
        ];
        assert_eq!(out.len(), 12);
        for (i, row) in want.iter().enumerate() {
            for (j, w) in row.iter().enumerate() {
                let got = out[i * 4 + j];
                assert!(
                    (w.is_nan() && got.is_nan()) || got == *w,
                    "row {i} feature {j}: got {got}, want {w}"
                );
            }
        }
    }

    #[test]
    fn refuses_a_text_column_without_a_vocabulary_naming_it() {
        let schema = Arc::new(Schema::new(vec![Field::new("city", DataType::Utf8, true)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(datafusion::arrow::array::StringArray::from(vec![
                "x",
            ]))],
        )
        .unwrap();
        let err = build(&batch, &[0], &[None], &mut Vec::new()).unwrap_err();
        assert!(err.contains("city") && err.contains("vocabulary"), "{err}");
    }

    #[test]
    fn a_category_is_its_code_in_the_vocabulary_and_nan_when_unseen_or_null() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("amount", DataType::Float64, false),
            Field::new("cvv", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, 4.0])),
                Arc::new(StringArray::from(vec![
                    Some("N"),
                    Some("M"),
                    Some("Z"),
                    None,
                ])),
            ],
        )
        .unwrap();
        let vocabulary: Vocabulary = [("M".to_string(), 0.0), ("N".to_string(), 1.0)].into();
        let mut out = Vec::new();
        build(&batch, &[1, 0], &[Some(vocabulary), None], &mut out).unwrap();
        assert_eq!(&out[..4], &[1.0, 1.0, 0.0, 2.0]);
        assert!(out[4].is_nan() && out[6].is_nan());
        assert_eq!((out[5], out[7]), (3.0, 4.0));
    }
}
