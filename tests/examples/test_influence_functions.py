from conftest import load_example


def test_ekfac_influence_ranks_like_exact_influence():
    results = load_example("influence_functions").main()
    assert results["spearman_ekfac_vs_ggn_mean"] > 0.5, results
    assert results["spearman_ekfac_vs_ggn_min"] > 0.3, results
    assert results["spearman_ekfac_vs_hessian_mean"] > 0.3, results
