from conftest import load_example


def test_fisher_merging_beats_averaging():
    results = load_example("model_merging").main()
    average = results["average_merge_loss"]
    # each fine-tuned model forgot the other task: averaging already helps
    assert average < min(results["task0_model_loss"], results["task1_model_loss"])
    assert results["diagonal_fisher_merge_loss"] < 0.9 * average, results
    assert results["full_fisher_merge_loss"] < 0.9 * average, results
