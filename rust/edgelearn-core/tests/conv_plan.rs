//! A convolution's algorithm is chosen once, by its `ConvPlan`: the plan names the algorithm a shape takes
//! (im2col + GEMM, the padded grid, the direct VNNI kernel where it runs, the grouped kernels), and running
//! a plan gives the same bits as the `conv2d_*` functions (dense) and `conv2d_grouped_*` (grouped).

use edgelearn_core::gemm::Scale;
use edgelearn_core::nn::conv::direct::direct_available;
use edgelearn_core::nn::{self, ConvAlgo, ConvPlan, GroupedParams, WeightScales};

mod common;
use common::Rng;

fn dense(x: [usize; 4], w: [usize; 4], stride: usize, pad: usize) -> ConvPlan {
    ConvPlan::dense(x, w, (stride, stride), (pad, pad)).unwrap()
}

#[test]
fn plan_names_the_algorithm_of_each_shape() {
    let grid = if direct_available() {
        ConvAlgo::DirectVnni
    } else {
        ConvAlgo::PaddedGrid
    };
    // stride 1, 3x3, padding 1 on 7x7: the padded grid
    assert_eq!(dense([32, 32, 7, 7], [64, 32, 3, 3], 1, 1).algo(), grid);
    // fewer than 4 input channels (an image's): one patch matrix and GEMM per image, written in place;
    // 5 input channels padded to 8 is more than a quarter extra: the grid through the GEMM
    for (x, w, algo) in [
        ([32, 1, 28, 28], [16, 1, 3, 3], ConvAlgo::Im2colGemm),
        ([2, 3, 40, 30], [16, 3, 3, 3], ConvAlgo::Im2colGemm),
        ([4, 5, 12, 12], [16, 5, 3, 3], ConvAlgo::PaddedGrid),
    ] {
        assert_eq!(dense(x, w, 1, 1).algo(), algo, "{x:?} {w:?}");
    }
    // stride 2 and 1x1 convolutions: a patch matrix (or the image itself) and the GEMM
    assert_eq!(
        dense([8, 16, 14, 14], [32, 16, 3, 3], 2, 1).algo(),
        ConvAlgo::Im2colGemm
    );
    assert_eq!(
        dense([8, 16, 14, 14], [32, 16, 1, 1], 1, 0).algo(),
        ConvAlgo::Im2colGemm
    );
    let depthwise = GroupedParams::new(16, (1, 1), (1, 1), (1, 1));
    let p = ConvPlan::new([8, 16, 14, 14], [16, 1, 3, 3], depthwise).unwrap();
    assert_eq!(p.algo(), ConvAlgo::Depthwise);
    assert_eq!(p.output(), [8, 16, 14, 14]);
    let dilated = GroupedParams::new(1, (1, 1), (2, 2), (2, 2));
    let p = ConvPlan::new([2, 4, 9, 9], [8, 4, 3, 3], dilated).unwrap();
    assert_eq!(p.algo(), ConvAlgo::Depthwise);
    let plain = GroupedParams::new(1, (1, 1), (1, 1), (1, 1));
    let p = ConvPlan::new([32, 32, 7, 7], [64, 32, 3, 3], plain).unwrap();
    assert_eq!(p.algo(), grid);
}

#[test]
fn plan_rejects_what_the_functions_reject() {
    let e = ConvPlan::dense([1, 3, 8, 8], [4, 2, 3, 3], (1, 1), (0, 0)).unwrap_err();
    assert!(e.to_string().contains("input channels"), "{e}");
    let p = GroupedParams::new(0, (1, 1), (0, 0), (1, 1));
    assert!(ConvPlan::new([1, 4, 8, 8], [4, 4, 3, 3], p).is_err());
}

#[test]
fn plan_for_per_tensor_weights_takes_the_small_plane_algorithm() {
    // the 4x4 maps of the digits CNN: one dense GEMM per product, only with one weight scale
    let (xs, ws) = ([4usize, 8, 4, 4], [16usize, 8, 3, 3]);
    let p = GroupedParams::new(1, (1, 1), (1, 1), (1, 1));
    let small = ConvPlan::with_weight_scales(xs, ws, p, WeightScales::PerTensor).unwrap();
    assert_eq!(small.algo(), ConvAlgo::SmallPlane);
    assert_ne!(
        ConvPlan::new(xs, ws, p).unwrap().algo(),
        ConvAlgo::SmallPlane
    );
    // a 7x7 map is not small: per-tensor weights change nothing there
    let big = ConvPlan::with_weight_scales([4, 8, 7, 7], ws, p, WeightScales::PerTensor).unwrap();
    assert_ne!(big.algo(), ConvAlgo::SmallPlane);

    // forward and dW give the bits of the general path; per-channel scales are refused, not misread
    let mut rng = Rng(11);
    let (xq, wq) = (rng.i8s(xs.iter().product()), rng.i8s(ws.iter().product()));
    let ny = small.output().iter().product::<usize>();
    let dyq = rng.i8s(ny);
    let (mut y_small, mut y_fn) = (vec![0f32; ny], vec![0f32; ny]);
    let sw = Scale::Scalar(0.02);
    small
        .forward_i8(&xq, 0.01, &wq, sw, None, &mut y_small)
        .unwrap();
    nn::conv2d_i8_forward(&xq, xs, 0.01, &wq, ws, sw, None, (1, 1), (1, 1), &mut y_fn).unwrap();
    assert_eq!(bits(&y_small), bits(&y_fn));
    let (mut dw_small, mut dw_fn) = (vec![0f32; wq.len()], vec![0f32; wq.len()]);
    small
        .backward_i8(&xq, 0.01, &wq, sw, &dyq, 0.03, None, &mut dw_small)
        .unwrap();
    nn::conv2d_i8_backward(
        &xq,
        xs,
        0.01,
        &wq,
        ws,
        sw,
        &dyq,
        0.03,
        (1, 1),
        (1, 1),
        None,
        &mut dw_fn,
    )
    .unwrap();
    assert_eq!(bits(&dw_small), bits(&dw_fn));
    let per_channel = vec![0.02f32; ws[0]];
    let e = small
        .forward_i8(
            &xq,
            0.01,
            &wq,
            Scale::PerIndex(&per_channel),
            None,
            &mut y_small,
        )
        .unwrap_err();
    assert!(e.to_string().contains("one weight scale per tensor"), "{e}");
    let e = small
        .backward_i8(
            &xq,
            0.01,
            &wq,
            Scale::PerIndex(&per_channel),
            &dyq,
            0.03,
            None,
            &mut dw_small,
        )
        .unwrap_err();
    assert!(e.to_string().contains("sw"), "{e}");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn running_a_plan_gives_the_bits_of_the_conv2d_functions() {
    let cases: &[([usize; 4], [usize; 4], GroupedParams)] = &[
        (
            [3, 8, 7, 7],
            [20, 8, 3, 3],
            GroupedParams::new(1, (1, 1), (1, 1), (1, 1)),
        ),
        (
            [2, 6, 11, 9],
            [5, 6, 3, 3],
            GroupedParams::new(1, (2, 2), (1, 1), (1, 1)),
        ),
        (
            [2, 8, 9, 9],
            [8, 1, 3, 3],
            GroupedParams::new(8, (1, 1), (1, 1), (1, 1)),
        ),
    ];
    let mut rng = Rng(7);
    for &(xs, ws, p) in cases {
        let plan = ConvPlan::new(xs, ws, p).unwrap();
        let ys = plan.output();
        let (nx, nw, ny) = (
            xs.iter().product::<usize>(),
            ws.iter().product::<usize>(),
            ys.iter().product::<usize>(),
        );
        let (xq, wq, dyq) = (rng.i8s(nx), rng.i8s(nw), rng.i8s(ny));
        let x: Vec<f32> = xq.iter().map(|&v| v as f32 * 0.01).collect();
        let w: Vec<f32> = wq.iter().map(|&v| v as f32 * 0.02).collect();
        let dy: Vec<f32> = dyq.iter().map(|&v| v as f32 * 0.03).collect();
        let bias: Vec<f32> = (0..ws[0]).map(|o| 0.1 * o as f32).collect();
        let (sx, sw, sdy) = (0.01, Scale::Scalar(0.02), 0.03);
        let grouped = p.groups != 1;

        let mut y_plan = vec![0f32; ny];
        let mut y_fn = vec![0f32; ny];
        plan.forward_i8(&xq, sx, &wq, sw, Some(&bias), &mut y_plan)
            .unwrap();
        if grouped {
            nn::conv2d_grouped_i8_forward(&xq, xs, sx, &wq, ws, sw, Some(&bias), p, &mut y_fn)
                .unwrap();
        } else {
            nn::conv2d_i8_forward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                sw,
                Some(&bias),
                p.stride,
                p.padding,
                &mut y_fn,
            )
            .unwrap();
        }
        assert_eq!(bits(&y_plan), bits(&y_fn), "i8 forward {xs:?}");

        let (mut dx_plan, mut dw_plan) = (vec![0f32; nx], vec![0f32; nw]);
        let (mut dx_fn, mut dw_fn) = (vec![0f32; nx], vec![0f32; nw]);
        plan.backward_i8(
            &xq,
            sx,
            &wq,
            sw,
            &dyq,
            sdy,
            Some(&mut dx_plan),
            &mut dw_plan,
        )
        .unwrap();
        if grouped {
            nn::conv2d_grouped_i8_backward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                sw,
                &dyq,
                sdy,
                p,
                Some(&mut dx_fn),
                &mut dw_fn,
            )
            .unwrap();
        } else {
            nn::conv2d_i8_backward(
                &xq,
                xs,
                sx,
                &wq,
                ws,
                sw,
                &dyq,
                sdy,
                p.stride,
                p.padding,
                Some(&mut dx_fn),
                &mut dw_fn,
            )
            .unwrap();
        }
        assert_eq!(bits(&dx_plan), bits(&dx_fn), "i8 dx {xs:?}");
        assert_eq!(bits(&dw_plan), bits(&dw_fn), "i8 dw {xs:?}");

        plan.forward_f32(&x, &w, Some(&bias), &mut y_plan).unwrap();
        if grouped {
            nn::conv2d_grouped_f32_forward(&x, xs, &w, ws, Some(&bias), p, &mut y_fn).unwrap();
        } else {
            nn::conv2d_f32_forward(&x, xs, &w, ws, Some(&bias), p.stride, p.padding, &mut y_fn)
                .unwrap();
        }
        assert_eq!(bits(&y_plan), bits(&y_fn), "f32 forward {xs:?}");

        let mut db_plan = vec![0f32; ws[0]];
        let mut db_fn = vec![0f32; ws[0]];
        plan.backward_f32(&x, &w, &dy, Some(&mut dx_plan), &mut dw_plan, &mut db_plan)
            .unwrap();
        if grouped {
            nn::conv2d_grouped_f32_backward(
                &x,
                xs,
                &w,
                ws,
                &dy,
                p,
                Some(&mut dx_fn),
                &mut dw_fn,
                &mut db_fn,
            )
            .unwrap();
        } else {
            nn::conv2d_f32_backward(
                &x,
                xs,
                &w,
                ws,
                &dy,
                p.stride,
                p.padding,
                Some(&mut dx_fn),
                &mut dw_fn,
                &mut db_fn,
            )
            .unwrap();
        }
        assert_eq!(bits(&dx_plan), bits(&dx_fn), "f32 dx {xs:?}");
        assert_eq!(bits(&dw_plan), bits(&dw_fn), "f32 dw {xs:?}");
        assert_eq!(bits(&db_plan), bits(&db_fn), "f32 db {xs:?}");
    }
}
