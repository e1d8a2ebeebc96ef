//! `train --schedule auto` on synthetic parts: in any orientation it trains and scores
//! with rotations, in a fixture it trains upright, and `rotate` stated by the user skips the check.

mod common;
use common::*;
use differnet::features::pose::ANY_POSE_BELOW;
use differnet::flow::train::Schedule;
use differnet::progress::Silent;
use differnet::settings::TrainSettings;

fn train(home: &std::path::Path, name: &str, fixed_pose: bool, settings: TrainSettings) -> differnet::model::Manifest {
    let data = home.join(name);
    if !data.exists() {
        differnet::data::synth::generate_parts(&data, 40, 0, 0, 5, fixed_pose).unwrap();
    }
    let settings = TrainSettings {
        epochs: Some(1),
        blocks: 2,
        hidden: 32,
        batch: 8,
        test_views: Some(4),
        no_feature_maps: true,
        cache_dir: Some(home.join("cache")),
        ..settings
    };
    let opts = settings.options(data, home.join(format!("{name}.safetensors")), &candle_core::Device::Cpu).unwrap();
    differnet::pipeline::train(&opts, &Silent, &Silent, &Silent).unwrap().manifest
}

fn auto() -> TrainSettings {
    TrainSettings { schedule: Schedule::Auto, ..TrainSettings::default() }
}

#[test]
fn the_auto_schedule_rotates_for_parts_in_any_orientation_only() {
    let home = home_with_efficientnet();
    std::env::set_var("DIFFERNET_HOME", home.path());
    let any = train(home.path(), "any", false, auto());
    let check = any.training.pose_check.clone().expect("auto checks the pose");
    assert!(check.any_pose && check.ratio < ANY_POSE_BELOW, "{check:?}");
    // 40 images: 6 held out (15%) probe the 34 fitted ones
    assert_eq!((check.probes, check.references), (6, 34));
    assert!(any.train.augment.rotate && any.train.views_per_image == 4, "the rotation schedule: {:?}", any.train);
    assert_eq!((any.train.cached_views, any.test_views), (8, 4), "the rotation schedule's cached views, the user's test views");

    let fixed = train(home.path(), "fixed", true, auto());
    let check = fixed.training.pose_check.clone().expect("auto checks the pose");
    assert!(!check.any_pose && check.ratio > ANY_POSE_BELOW, "{check:?}");
    assert!(!fixed.train.augment.rotate && fixed.train.views_per_image == 1, "the fast schedule: {:?}", fixed.train);

    // a stated pose: no check, the user's rotation
    let stated = train(home.path(), "any", false, TrainSettings { rotate: Some(false), ..auto() });
    assert!(stated.training.pose_check.is_none() && !stated.train.augment.rotate);
}
