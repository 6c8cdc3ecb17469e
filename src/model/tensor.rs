//! The `[N, F]` float32 input tensor of the model, built straight from the Arrow feature columns.
//!
//! Row-major (`out[row * F + feature]`), features in the model's declared order. NULL becomes NaN,
//! which is what `models/train.py` feeds for a missing value too (LightGBM's missing value, taken
//! down the branch learned for missing values). Integers and booleans are converted to f32 (exact
//! up to 2^24, far beyond any count a window yields).

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
};
use datafusion::arrow::datatypes::DataType;

/// The name a feature type has in `payguard.feature_types` (as `models/train.py` writes it), or
/// `None` for a type the model cannot take.
pub fn type_name(t: &DataType) -> Option<&'static str> {
    Some(match t {
        DataType::Float64 => "float64",
        DataType::Float32 => "float32",
        DataType::Int64 => "int64",
        DataType::Int32 => "int32",
        DataType::Boolean => "bool",
        _ => return None,
    })
}

/// Write column `col` into slot `j` of every row of `out` (`width` values per row).
fn fill_column(col: &ArrayRef, j: usize, width: usize, out: &mut [f32]) -> Result<(), String> {
    let n = col.len();
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
        other => return Err(format!("type {other} cannot be a model input")),
    }
    Ok(())
}

/// Fill `out` with the `[rows, columns.len()]` tensor of `batch`'s columns `columns` (indexes, in
/// the model's order). `out` is resized; its allocation is reused between calls.
pub fn build(batch: &RecordBatch, columns: &[usize], out: &mut Vec<f32>) -> Result<(), String> {
    let (n, width) = (batch.num_rows(), columns.len());
    out.clear();
    out.resize(n * width, 0.0);
    for (j, &c) in columns.iter().enumerate() {
        let col = batch.column(c);
        fill_column(col, j, width, out)
            .map_err(|e| format!("column {}: {e}", batch.schema().field(c).name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        build(&batch, &[1, 3, 0, 2], &mut out).unwrap();
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
    fn refuses_a_text_column_naming_it() {
        let schema = Arc::new(Schema::new(vec![Field::new("city", DataType::Utf8, true)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(datafusion::arrow::array::StringArray::from(vec![
                "x",
            ]))],
        )
        .unwrap();
        let err = build(&batch, &[0], &mut Vec::new()).unwrap_err();
        assert!(err.contains("city") && err.contains("Utf8"), "{err}");
    }
}
