//! Grad-CAM looks at the lesions: on generated eyes, the heat on the rendered lesions is higher
//! than on the rest of the fundus.

use retina_infer::engine::Engine;
use retina_infer::heatmap::grad_cam;
use retina_model::BackendChoice;
use retina_train::synth::{Layers, render, scene_for};

#[test]
fn heat_concentrates_on_rendered_lesions() {
    let engine = Engine::load(None, BackendChoice::Cpu).unwrap();
    let pre = &engine.bundle.metadata.config.preprocess;
    let mut ratios = Vec::new();
    for i in 0..8 {
        // Severe and proliferative eyes: many lesions spread over the fundus.
        let scene = scene_for(900, i, 192, &[0.0, 0.0, 0.0, 1.0, 1.0]);
        let with = pre.crop_and_resize(&render(&scene, Layers { lesions: true }));
        let without = pre.crop_and_resize(&render(&scene, Layers { lesions: false }));
        let heat = grad_cam(
            &engine.bundle,
            &pre.normalise(&with),
            &engine.backend.device,
        )
        .unwrap();
        let (mut on, mut n_on, mut off, mut n_off) = (0.0f64, 0usize, 0.0f64, 0usize);
        for (x, y, a) in with.enumerate_pixels() {
            let b = without.get_pixel(x, y);
            let diff: i32 = (0..3).map(|c| (a[c] as i32 - b[c] as i32).abs()).sum();
            let inside = b[0] as u32 + b[1] as u32 + b[2] as u32 > 90;
            let h = heat.values[y as usize * heat.size + x as usize] as f64;
            if diff > 40 {
                on += h;
                n_on += 1;
            } else if inside && diff == 0 {
                off += h;
                n_off += 1;
            }
        }
        assert!(
            n_on > 20 && n_off > 1000,
            "image {i}: {n_on} lesion px, {n_off} background px"
        );
        ratios.push((on / n_on as f64) / (off / n_off as f64).max(1e-9));
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    eprintln!("lesion / background heat ratios: {ratios:.2?}, mean {mean:.2}");
    assert!(mean > 1.3, "heat should concentrate on lesions: {ratios:?}");
    assert!(
        ratios.iter().filter(|r| **r > 1.0).count() >= 6,
        "{ratios:?}"
    );
}
