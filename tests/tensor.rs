//! Tensor views: shape/dtype/device checks, contiguity, strided lanes and packed copies,
//! writability and overlap, owned results.

use proptest::prelude::*;
use tvc_rs::dtype::DType;
use tvc_rs::tensor::{Device, OwnedTensor, Strided, TensorView};

use tvc_rs::Error;

fn raw_view<'a>(
    data: &'a [f32],
    offset: isize,
    shape: &[usize],
    strides: &[isize],
) -> TensorView<'a> {
    // SAFETY: every test below keeps the addressed elements inside `data`.
    unsafe {
        TensorView::from_raw_parts(
            "x",
            (data.as_ptr() as *mut f32).offset(offset) as *mut u8,
            DType::F32,
            shape.to_vec(),
            strides.to_vec(),
            Device::Cpu,
            false,
            false,
        )
    }
}

/// Element `index` of a strided tensor, read the obvious way.
fn at(data: &[f32], offset: isize, strides: &[isize], index: &[usize]) -> f32 {
    let pos: isize = offset
        + index
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i as isize * s)
            .sum::<isize>();
    data[pos as usize]
}

#[test]
fn checks_name_the_argument() {
    let data = vec![0f32; 60];
    let view = TensorView::from_slice("x", &data, &[3, 4, 5]).unwrap();
    let err = view.expect_rank(2, "[tokens, dim]").unwrap_err();
    assert_eq!(
        err,
        Error::Value("x: expected a 2-D tensor [tokens, dim], got shape (3, 4, 5)".into())
    );
    let err = view.expect_dtypes(&[DType::I32, DType::I64]).unwrap_err();
    assert_eq!(
        err,
        Error::Type("x: expected dtype int32 or int64, got float32".into())
    );
    assert!(view.expect_rank(3, "").is_ok() && view.expect_cpu().is_ok() && view.is_contiguous());
    assert!(
        matches!(view.as_slice::<i64>(), Err(Error::Type(msg)) if msg.starts_with("x: expected dtype int64"))
    );
    assert_eq!(view.as_slice::<f32>().unwrap().len(), 60);
    assert!(TensorView::from_slice("y", &data, &[7, 9]).is_err());
}

#[test]
fn cuda_and_other_devices_are_refused_on_cpu_paths() {
    let data = vec![0f32; 4];
    // SAFETY: never dereferenced (device checks come first).
    let view = unsafe {
        TensorView::from_raw_parts(
            "keys",
            data.as_ptr() as *mut u8,
            DType::F32,
            vec![4],
            vec![1],
            Device::Cuda(1),
            false,
            false,
        )
    };
    let err = view.as_slice::<f32>().unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("keys: expected a CPU tensor like the other arguments, got one on cuda:1") && m.contains("cuda:1"))
    );
    let cpu = TensorView::from_slice("query", &data, &[4]).unwrap();
    let err = view.expect_same_device(&cpu).unwrap_err();
    assert_eq!(
        err,
        Error::Value(
            "keys: expected a tensor on the same device as query (cpu), got cuda:1".into()
        )
    );
}

#[test]
fn writes_need_a_mutable_writable_view() {
    let mut data = vec![1f32; 6];
    {
        let mut view = TensorView::from_mut_slice("cache", &mut data, &[2, 3]).unwrap();
        view.as_mut_slice::<f32>().unwrap()[4] = 7.0;
        // A read-only reborrow cannot write.
        let mut shared = view.reborrow();
        assert!(matches!(
            shared.as_mut_slice::<f32>(),
            Err(Error::Runtime(_))
        ));
    }
    assert_eq!(data[4], 7.0);
    // SAFETY: in bounds; read-only owner.
    let mut readonly = unsafe {
        TensorView::from_raw_parts(
            "cache",
            data.as_mut_ptr() as *mut u8,
            DType::F32,
            vec![6],
            vec![1],
            Device::Cpu,
            true,
            true,
        )
    };
    let err = readonly.as_mut_slice::<f32>().unwrap_err();
    assert!(matches!(&err, Error::Value(m) if m.starts_with("cache: the array is read-only")));
}

#[test]
fn overlap_and_self_overlap() {
    let data = vec![0f32; 100];
    let a = raw_view(&data, 0, &[10, 5], &[10, 1]);
    let b = raw_view(&data, 5, &[10, 5], &[10, 1]);
    let c = raw_view(&data, 50, &[5], &[1]);
    assert!(a.overlaps(&c));
    // a and b interleave column blocks: their byte ranges intersect (conservative answer).
    assert!(a.overlaps(&b));
    let d = raw_view(&data, 95, &[5], &[1]);
    let e = raw_view(&data, 0, &[5], &[1]);
    assert!(!d.overlaps(&e));
    assert!(a.is_non_overlapping());
    assert!(!raw_view(&data, 0, &[4, 4], &[1, 1]).is_non_overlapping());
    assert!(!raw_view(&data, 0, &[4, 4], &[0, 1]).is_non_overlapping());
}

#[test]
fn strided_borrows_lanes_and_packs_the_rest() {
    let data: Vec<f32> = (0..120).map(|v| v as f32).collect();
    // x[1:4, 2:6] of a 10x12 matrix: borrowed.
    let view = raw_view(&data, 14, &[3, 4], &[12, 1]);
    let strided = view.strided::<f32>().unwrap();
    assert!(strided.is_borrowed());
    assert_eq!(strided.row(2), &[38.0, 39.0, 40.0, 41.0]);
    assert!(!view.is_contiguous());
    assert!(
        matches!(view.expect_contiguous(), Err(Error::Value(m)) if m.contains("strides (12, 1)"))
    );
    // The transpose of a 10x12 matrix: packed.
    let view = raw_view(&data, 0, &[12, 10], &[1, 12]);
    let strided = view.strided::<f32>().unwrap();
    assert!(!strided.is_borrowed());
    assert_eq!(strided.row(1)[..3], [1.0, 13.0, 25.0]);
    assert!(
        matches!(view.strided_no_copy::<f32>(), Err(Error::Value(m)) if m.starts_with("x: expected a tensor whose last axis is contiguous"))
    );
    // Reversed rows (negative stride): packed.
    let view = raw_view(&data, 108, &[10, 12], &[-12, 1]);
    assert_eq!(view.strided::<f32>().unwrap().row(0)[0], 108.0);
    // Empty tensors.
    let view = raw_view(&data, 0, &[0, 12], &[12, 1]);
    assert_eq!(view.strided::<f32>().unwrap().numel(), 0);
}

fn shape_and_strides() -> impl Strategy<Value = (Vec<usize>, Vec<isize>, isize)> {
    prop::collection::vec((0usize..5, -3isize..4), 1..4).prop_map(|axes| {
        let shape: Vec<usize> = axes.iter().map(|a| a.0).collect();
        // Scale strides so axes do not step on each other too often; any overlap is still legal.
        let strides: Vec<isize> = axes
            .iter()
            .enumerate()
            .map(|(i, a)| a.1 * (1 + 4isize.pow(i as u32)))
            .collect();
        // Offset so that every index stays non-negative.
        let low: isize = shape
            .iter()
            .zip(&strides)
            .map(|(&d, &s)| {
                if s < 0 && d > 0 {
                    (d as isize - 1) * s
                } else {
                    0
                }
            })
            .sum();
        (shape, strides, -low)
    })
}

proptest! {
    /// Packed or borrowed, lanes and row-major copies hold exactly the elements at the strides.
    #[test]
    fn strided_reads_every_layout((shape, strides, offset) in shape_and_strides()) {
        let data: Vec<f32> = (0..4096).map(|v| v as f32).collect();
        let view = raw_view(&data, offset, &shape, &strides);
        let strided = view.strided::<f32>().unwrap();
        let flat = strided.to_contiguous().unwrap();
        prop_assert_eq!(flat.len(), view.numel());
        let mut index = vec![0usize; shape.len()];
        for value in flat.iter() {
            prop_assert_eq!(*value, at(&data, offset, &strides, &index));
            for axis in (0..shape.len()).rev() {
                index[axis] += 1;
                if index[axis] < shape[axis] { break; }
                index[axis] = 0;
            }
        }
        if let Some(span) = view.byte_span() {
            let base = data.as_ptr() as usize;
            prop_assert!(span.0 >= base && span.1 <= base + 4 * data.len());
        }
    }
}

#[test]
fn strided_constructors_check_their_span() {
    let data = vec![0f32; 10];
    assert!(Strided::new(&data, &[2, 5], &[5, 1]).is_ok());
    assert!(Strided::new(&data, &[3, 5], &[5, 1]).is_err());
    assert!(Strided::new(&data, &[2, 5], &[5, 2]).is_err());
    assert!(Strided::contiguous(&data, &[3, 3]).is_err());
}

#[test]
fn owned_tensors_view_their_elements() {
    let owned = OwnedTensor::new(vec![1i64, 2, 3, 4, 5, 6], vec![2, 3]).unwrap();
    assert_eq!(owned.dtype(), DType::I64);
    assert_eq!(
        owned.view("out").as_slice::<i64>().unwrap(),
        &[1, 2, 3, 4, 5, 6]
    );
    assert!(owned.as_slice::<f32>().is_none());
    assert!(OwnedTensor::new(vec![1f32], vec![2]).is_err());
}

#[test]
fn strided_mut_writes_lanes_in_place() {
    // Write into x[:, 1:3, :] of a [2, 4, 3] tensor, in parallel and lane by lane.
    let mut data = vec![0f32; 24];
    {
        // SAFETY: the view stays inside `data`, which it borrows mutably.
        let mut view = unsafe {
            TensorView::from_raw_parts(
                "cache",
                data.as_mut_ptr().add(3) as *mut u8,
                DType::F32,
                vec![2, 2, 3],
                vec![12, 3, 1],
                Device::Cpu,
                false,
                true,
            )
        };
        let mut lanes = view.strided_mut::<f32>().unwrap();
        assert_eq!(lanes.lanes(), 4);
        lanes.par_for_each_lane(|lane, out| out.iter_mut().for_each(|v| *v = lane as f32 + 1.0));
        lanes.lane_mut(3)[2] = 9.0;
        assert_eq!(lanes.lane(3), &[4.0, 4.0, 9.0]);
    }
    let want = [
        0., 0., 0., 1., 1., 1., 2., 2., 2., 0., 0., 0., 0., 0., 0., 3., 3., 3., 4., 4., 9., 0., 0.,
        0.,
    ];
    assert_eq!(data, want);
    // Read-only, overlapping and transposed views are refused.
    let mut shared = TensorView::from_slice("cache", &data, &[24]).unwrap();
    assert!(shared.strided_mut::<f32>().is_err());
    // SAFETY: in bounds.
    let mut overlapping = unsafe {
        TensorView::from_raw_parts(
            "cache",
            data.as_mut_ptr() as *mut u8,
            DType::F32,
            vec![4, 4],
            vec![1, 1],
            Device::Cpu,
            false,
            true,
        )
    };
    assert!(
        matches!(overlapping.strided_mut::<f32>(), Err(Error::Value(m)) if m.contains("share memory"))
    );
    let mut transposed = unsafe {
        TensorView::from_raw_parts(
            "cache",
            data.as_mut_ptr() as *mut u8,
            DType::F32,
            vec![4, 6],
            vec![1, 4],
            Device::Cpu,
            false,
            true,
        )
    };
    assert!(
        matches!(transposed.strided_mut::<f32>(), Err(Error::Value(m)) if m.starts_with("cache: expected a tensor whose last axis is contiguous"))
    );
}
