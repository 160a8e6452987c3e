from conftest import load_example


def test_saliency_pruning_hurts_less_than_magnitude_pruning():
    module = load_example("obs_pruning")
    results = module.main()
    for s in module.SPARSITIES:
        obs, magnitude = results[f"obs_increase_{s:.0%}"], results[f"magnitude_increase_{s:.0%}"]
        assert 0 <= obs < 0.8 * magnitude, results
