//! The loss against PyTorch's exact values (shared/peer/loss_reference.txt, float32 section),
//! to 1e-5, values and gradients, including the masked (missing-label) fluid case.
//!
//! The expected values are torch's printout, copied digit for digit so they can be traced.
#![allow(clippy::excessive_precision)]

use burn::prelude::*;
use retina_model::{HeadKind, HeadSpec, Link};
use retina_train::loss::{
    ClassWeights, HeadLossConfig, HeadTargets, LossConfig, LossKind, Objective, RetinaLoss,
};

const LOGITS: [[f32; 5]; 4] = [
    [2.0, -1.0, 0.5, 0.0, -0.5],
    [0.1, 0.2, 0.3, 0.4, 0.5],
    [-1.5, 0.0, 2.5, -0.5, 1.0],
    [0.3, -0.7, 0.0, 1.2, -2.0],
];
const LABELS: [f32; 4] = [0.0, 4.0, 1.0, 3.0];
const FLUID_LOGITS: [f32; 4] = [1.2, -0.8, 0.0, 2.5];
const FLUID_TARGETS: [f32; 4] = [1.0, 0.0, 1.0, 0.0];
const VESSEL_PRED: [f32; 4] = [0.3, 1.5, -0.2, 0.8];
const VESSEL_TARGET: [f32; 4] = [0.5, 1.0, 0.0, 1.1];
const L2_PARAMS_SUM_SQ: f32 = 3.355; // sum of squares of the literal parameter set

fn specs() -> Vec<HeadSpec> {
    vec![
        // The diagnosis spec carries the referable rule the screening bias tilts.
        HeadSpec::diagnosis(),
        HeadSpec::new("fluid".into(), HeadKind::Binary),
        // The reference's vessel output is the value itself, trained with L1.
        HeadSpec::vessel_growth().with_link(Link::Identity),
    ]
}

fn reference_loss() -> RetinaLoss {
    LossConfig::new()
        .with_heads(vec![
            HeadLossConfig::new("diagnosis".into())
                .with_class_weights(ClassWeights::Manual(vec![1.0, 2.0, 2.0, 4.0, 4.0])),
            HeadLossConfig::new("fluid".into())
                .with_weight(0.5)
                .with_pos_weight(Some(5.0)),
            HeadLossConfig::new("vessel_growth".into()).with_weight(0.5),
        ])
        .init(&specs(), &|_| None)
        .unwrap()
}

/// A regression through the logistic link: its default loss is the cross entropy with the
/// label scaled into 0..1 as the soft target, and L1 / MSE compare the linked value with the
/// label; the gradients are those of the formulas. A raw-output regression refuses BCE and
/// says what it needs.
#[test]
fn a_logistic_regression_learns_its_label_as_a_soft_target() {
    let spec = HeadSpec::new("cdr".into(), HeadKind::Regression)
        .with_range(Some([0.2, 1.0]))
        .with_link(Link::Logistic);
    let device = Device::flex().autodiff();
    let z = [0.3f32, -1.5, 2.0, 0.0];
    let label = [0.2f32, 0.6, 1.0, 0.9];
    let present = [Some(label[0]), Some(label[1]), None, Some(label[3])];
    let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
    let host_loss = |kind: Option<LossKind>| {
        let mut h = HeadLossConfig::new("cdr".into());
        h.loss = kind;
        let loss = LossConfig::new()
            .with_heads(vec![h])
            .init(std::slice::from_ref(&spec), &|_| None)
            .unwrap();
        let x = Tensor::<2>::from_data([z], &device)
            .transpose()
            .require_grad();
        let l = loss.heads[0].forward(x.clone(), &HeadTargets::from_options(&present, &device));
        let grads = l.backward();
        (host(l)[0], host(x.grad(&grads).unwrap()))
    };
    let kept = [0, 1, 3];
    // BCE: -(t log s + (1 - t) log(1 - s)) with t = (y - 0.2) / 0.8; d/dz = (s - t) / 3.
    let t = |i: usize| (label[i] - 0.2) / 0.8;
    let want: f32 = kept
        .iter()
        .map(|&i| -(t(i) * sig(z[i]).ln() + (1.0 - t(i)) * (1.0 - sig(z[i])).ln()))
        .sum::<f32>()
        / 3.0;
    let (got, g) = host_loss(None);
    close(&[got], &[want], "soft-target BCE");
    let want_g: Vec<f32> = (0..4)
        .map(|i| {
            if i == 2 {
                0.0
            } else {
                (sig(z[i]) - t(i)) / 3.0
            }
        })
        .collect();
    close(&g, &want_g, "soft-target BCE gradient");
    // MSE on the value 0.2 + 0.8 s.
    let v = |i: usize| 0.2 + 0.8 * sig(z[i]);
    let want: f32 = kept.iter().map(|&i| (v(i) - label[i]).powi(2)).sum::<f32>() / 3.0;
    let (got, g) = host_loss(Some(LossKind::Mse));
    close(&[got], &[want], "MSE on the linked value");
    let i = 1;
    let dg = 2.0 * (v(i) - label[i]) * 0.8 * sig(z[i]) * (1.0 - sig(z[i])) / 3.0;
    close(&[g[i]], &[dg], "MSE gradient through the link");
    let want: f32 = kept.iter().map(|&i| (v(i) - label[i]).abs()).sum::<f32>() / 3.0;
    close(
        &[host_loss(Some(LossKind::L1)).0],
        &[want],
        "L1 on the linked value",
    );

    let raw = HeadSpec::new("cdr".into(), HeadKind::Regression);
    let mut h = HeadLossConfig::new("cdr".into());
    h.loss = Some(LossKind::Bce);
    let e = LossConfig::new()
        .with_heads(vec![h])
        .init(&[raw], &|_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("link = \"logistic\""), "{e}");
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5, "{what}: got {got:?}, want {want:?}");
    }
}

struct Run {
    ce: f32,
    bce: f32,
    l1: f32,
    total: f32,
    g_logits: Vec<f32>,
    g_fluid: Vec<f32>,
    g_vessel: Vec<f32>,
}

fn run(fluid: &[Option<f32>]) -> Run {
    let device = Device::flex().autodiff();
    let loss = reference_loss();
    let z = Tensor::<2>::from_data(LOGITS, &device).require_grad();
    let fx = Tensor::<2>::from_data([FLUID_LOGITS], &device)
        .transpose()
        .require_grad();
    let vp = Tensor::<2>::from_data([VESSEL_PRED], &device)
        .transpose()
        .require_grad();
    let targets = [
        HeadTargets::from_options(&LABELS.map(Some), &device),
        HeadTargets::from_options(fluid, &device),
        HeadTargets::from_options(&VESSEL_TARGET.map(Some), &device),
    ];
    let ce = loss.heads[0].forward(z.clone(), &targets[0]);
    let bce = loss.heads[1].forward(fx.clone(), &targets[1]);
    let l1 = loss.heads[2].forward(vp.clone(), &targets[2]);
    let total = ce.clone() * loss.heads[0].weight
        + bce.clone() * loss.heads[1].weight
        + l1.clone() * loss.heads[2].weight
        + loss.l2 * L2_PARAMS_SUM_SQ;
    let grads = total.backward();
    Run {
        ce: host(ce)[0],
        bce: host(bce)[0],
        l1: host(l1)[0],
        total: host(total)[0],
        g_logits: host(z.grad(&grads).unwrap()),
        g_fluid: host(fx.grad(&grads).unwrap()),
        g_vessel: host(vp.grad(&grads).unwrap()),
    }
}

#[test]
fn matches_torch_on_the_reference_inputs() {
    let r = run(&FLUID_TARGETS.map(Some));
    close(&[r.ce], &[1.2976845502853394], "ce_weighted_mean (torch)");
    close(&[r.bce], &[1.9330346584320068], "bce_pos_weight5_mean");
    close(&[r.l1], &[0.30000001192092896], "l1_mean");
    close(&[r.total], &[2.4145374298095703], "combined_with_l2");
    close(
        &r.g_logits,
        &[
            -0.029910098761320114,
            0.0030369614250957966,
            0.013610715977847576,
            0.008255316875874996,
            0.005007103085517883,
            0.05895286053419113,
            0.06515298038721085,
            0.07200518995523453,
            0.07957803457975388,
            -0.275689035654068,
            0.0024248689878731966,
            -0.17095068097114563,
            0.13239336013793945,
            0.006591477431356907,
            0.029540952295064926,
            0.07789048552513123,
            0.028654305264353752,
            0.0577026903629303,
            -0.1720566749572754,
            0.0078092096373438835,
        ],
        "grad wrt logits",
    );
    close(
        &r.g_fluid,
        &[
            -0.1446719765663147,
            0.03875318914651871,
            -0.3125,
            0.11551772803068161,
        ],
        "grad wrt fluid logits",
    );
    close(
        &r.g_vessel,
        &[-0.125, 0.125, -0.125, -0.125],
        "grad wrt vessel pred",
    );
}

#[test]
fn missing_fluid_label_is_masked_without_nan() {
    // Sample 2's fluid label is missing (NaN in the source data).
    let r = run(&[Some(1.0), Some(0.0), None, Some(0.0)]);
    close(&[r.bce], &[1.422134280204773], "bce_masked_mean");
    close(&[r.total], &[2.1590871810913086], "masked combined_with_l2");
    // 0.5 * torch's grad_bce_masked_wrt_fluid_logits, and exactly 0 for the missing sample.
    close(
        &r.g_fluid,
        &[
            -0.38579195737838745 * 0.5,
            0.10334184020757675 * 0.5,
            0.0,
            0.3080472946166992 * 0.5,
        ],
        "masked grad wrt fluid logits",
    );
    assert!(r.g_fluid.iter().all(|g| g.is_finite()));
}

#[test]
fn a_head_with_no_labels_in_the_batch_contributes_zero() {
    let r = run(&[None, None, None, None]);
    assert_eq!(r.bce, 0.0);
    assert_eq!(r.g_fluid, vec![0.0; 4]);
    close(
        &[r.total],
        &[r.ce + 0.5 * r.l1 + 1e-4 * L2_PARAMS_SUM_SQ],
        "total without fluid",
    );
}

#[test]
fn screening_bias_weights_missed_positives_more() {
    let device = Device::flex();
    let make = |objective| {
        LossConfig::new()
            .with_objective(objective)
            .with_bias_factor(10.0)
            .init(&specs(), &|_| None)
            .unwrap()
    };
    let logit = Tensor::<2>::from_data([[0.0f32]], &device);
    let positive = HeadTargets::from_options(&[Some(1.0)], &device);
    let negative = HeadTargets::from_options(&[Some(0.0)], &device);
    let value = |l: &RetinaLoss, t: &HeadTargets| host(l.heads[1].forward(logit.clone(), t))[0];
    let (s, c, b) = (
        make(Objective::Screening),
        make(Objective::Confirmation),
        make(Objective::Balanced),
    );
    // At p = 0.5 both errors cost ln 2 when balanced.
    assert!((value(&b, &positive) - std::f32::consts::LN_2).abs() < 1e-6);
    assert!((value(&s, &positive) / value(&s, &negative) - 10.0).abs() < 1e-4);
    assert!((value(&c, &negative) / value(&c, &positive) - 10.0).abs() < 1e-4);
    // The referable classes of the diagnosis head are tilted the same way.
    assert_eq!(
        s.heads[0].class_weights.as_deref(),
        Some(&[1.0, 1.0, 10.0, 10.0, 10.0][..])
    );
    assert_eq!(
        c.heads[0].class_weights.as_deref(),
        Some(&[10.0, 10.0, 1.0, 1.0, 1.0][..])
    );
}

#[test]
fn class_weights_by_hand_and_from_frequencies() {
    let manual = LossConfig::new()
        .with_heads(vec![
            HeadLossConfig::new("fluid".into())
                .with_class_weights(ClassWeights::Manual(vec![1.0, 1000.0])),
        ])
        .init(&specs(), &|_| None)
        .unwrap();
    assert_eq!(manual.heads[1].binary_weights, [1.0, 1000.0]);
    let auto = LossConfig::new()
        .with_heads(vec![
            HeadLossConfig::new("diagnosis".into())
                .with_class_weights(ClassWeights::Named("auto".into())),
        ])
        .init(&specs(), &|h| {
            (h == "diagnosis").then(|| vec![730, 70, 150, 25, 25])
        })
        .unwrap();
    let w = auto.heads[0].class_weights.clone().unwrap();
    assert!(
        (w[0] - 1000.0 / (5.0 * 730.0)).abs() < 1e-6 && (w[3] - 8.0).abs() < 1e-6,
        "{w:?}"
    );
    // Mistakes are reported, not panicked on.
    let e = LossConfig::new()
        .with_heads(vec![
            HeadLossConfig::new("fluid".into()).with_class_weights(ClassWeights::Manual(vec![1.0])),
        ])
        .init(&specs(), &|_| None)
        .unwrap_err();
    assert!(e.to_string().contains("2 positive class weights"), "{e}");
    let e = LossConfig::new()
        .with_heads(vec![HeadLossConfig::new("edema".into())])
        .init(&specs(), &|_| None)
        .unwrap_err();
    assert!(e.to_string().contains("`edema` is not a head"), "{e}");
}

/// Cross entropy with class weights *and* label smoothing, as PyTorch's
/// `CrossEntropyLoss(weight=w, label_smoothing=e)` computes it (aten's
/// `cross_entropy_loss_label_smoothing`, mean reduction): each class's smoothing term carries
/// that class's weight, and the sum is divided by the weights of the true classes,
/// `[(1-e) sum_i w[y_i] nll_i + e/C sum_i sum_c w[c] (-log p_ic)] / sum_i w[y_i]`.
/// Computed here in f64 from the definition.
#[test]
fn label_smoothing_with_class_weights_weights_each_class_term_as_torch_does() {
    let (w, e) = ([1.0f64, 2.0, 2.0, 4.0, 4.0], 0.1f64);
    let mut num = 0.0;
    let mut den = 0.0;
    for (z, y) in LOGITS.iter().zip(LABELS) {
        let z: Vec<f64> = z.iter().map(|v| *v as f64).collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        let y = y as usize;
        let smooth: f64 = (0..5).map(|c| w[c] * (lse - z[c])).sum::<f64>() / 5.0;
        num += (1.0 - e) * w[y] * (lse - z[y]) + e * smooth;
        den += w[y];
    }
    let want = (num / den) as f32;
    let loss = LossConfig::new()
        .with_heads(vec![
            HeadLossConfig::new("diagnosis".into())
                .with_class_weights(ClassWeights::Manual(w.map(|v| v as f32).to_vec()))
                .with_label_smoothing(Some(e as f32)),
        ])
        .init(&specs(), &|_| None)
        .unwrap();
    let device = Device::flex();
    let z = Tensor::<2>::from_data(LOGITS, &device);
    let t = HeadTargets::from_options(&LABELS.map(Some), &device);
    let got = host(loss.heads[0].forward(z, &t))[0];
    assert!(
        (got - want).abs() < 1e-5,
        "got {got}, torch's definition gives {want}"
    );
}

/// The combined loss as training computes it: `RetinaLoss::forward` itself, on a real network,
/// with the reference head outputs. The head terms carry their weights in spec order (torch's
/// combined value less its L2 term), and the L2 term is l2 times the network's sum of squares:
/// the head outputs are not connected to the network, so each parameter's gradient must be
/// exactly the L2 term's, 2·l2·p.
#[test]
fn the_combined_loss_through_retina_loss_forward() {
    use retina_model::{RetinaConfig, RetinaOutput};
    let device = Device::flex().autodiff();
    let loss = reference_loss();
    let mut config = RetinaConfig::preset("small").unwrap();
    config.heads = specs();
    config.preprocess.image_size = 32;
    let model = config.init(&device).unwrap();
    let out = RetinaOutput {
        heads: vec![
            Tensor::<2>::from_data(LOGITS, &device).require_grad(),
            Tensor::<2>::from_data([FLUID_LOGITS], &device).transpose(),
            Tensor::<2>::from_data([VESSEL_PRED], &device).transpose(),
        ],
        embeddings: Vec::new(),
        names: vec!["diagnosis".into(), "fluid".into(), "vessel_growth".into()],
    };
    let targets = [
        HeadTargets::from_options(&LABELS.map(Some), &device),
        HeadTargets::from_options(&FLUID_TARGETS.map(Some), &device),
        HeadTargets::from_options(&VESSEL_TARGET.map(Some), &device),
    ];
    let b = loss.forward(&model, &out, &targets);
    let names: Vec<&str> = b.heads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["diagnosis", "fluid", "vessel_growth"]);
    let per_head: Vec<f32> = b.heads.iter().map(|(_, t)| host(t.clone())[0]).collect();
    close(
        &per_head,
        &[1.2976845502853394, 1.9330346584320068, 0.30000001192092896],
        "per-head losses",
    );
    let l2_sum = host(b.l2_sum.clone())[0];
    let total = host(b.total.clone())[0];
    let torch_heads = 2.4145374298095703 - loss.l2 * L2_PARAMS_SUM_SQ;
    close(
        &[total],
        &[torch_heads + loss.l2 * l2_sum],
        "total = weighted heads + l2 * sum(p^2)",
    );

    let grads = b.total.backward();
    let w = model.heads[0].out.weight.val();
    let g = w.grad(&grads).expect("the L2 term reaches every parameter");
    let want: Vec<f32> = host(w.clone().inner())
        .iter()
        .map(|p| 2.0 * loss.l2 * p)
        .collect();
    close(&host(g), &want, "d total / d head weight = 2 l2 p");
    let g_logits = host(out.heads[0].grad(&grads).unwrap());
    close(
        &g_logits[..5],
        &[
            -0.029910098761320114,
            0.0030369614250957966,
            0.013610715977847576,
            0.008255316875874996,
            0.005007103085517883,
        ],
        "grad wrt logits, first row",
    );
}
