from conftest import load_example


def test_second_order_methods_beat_tuned_gradient_descent():
    results = load_example("second_order_optimization").main()
    gd = results["gd_final_loss"]
    assert gd < results["initial_loss"]
    for method in ("newton_cg", "neumann", "kfac"):
        assert results[f"{method}_final_loss"] < 0.8 * gd, results
