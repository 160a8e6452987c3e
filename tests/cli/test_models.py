import torch

from curvops.cli.models import layer_sizes, make_digits_cnn, make_digits_mlp, seeded


def test_cnn_shape_and_size():
    model = make_digits_cnn()
    assert model(torch.zeros(3, 1, 8, 8, dtype=torch.float64)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 720
    assert layer_sizes(model) == [("conv1", 50), ("conv2", 230), ("conv3", 230), ("fc", 210)]
    assert sum(p.numel() for p in make_digits_cnn(channels=2).parameters()) == 186


def test_models_are_reproducible_and_leave_the_rng_alone():
    state = torch.random.get_rng_state()
    a, b = make_digits_mlp(seed=3), make_digits_mlp(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc1.weight, make_digits_mlp(seed=4).fc1.weight)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).shape == (2, 10)


def test_seeded_calls_factory_with_fixed_seed():
    assert torch.equal(seeded(lambda: torch.randn(3), 0), seeded(lambda: torch.randn(3), 0))


def test_layer_sizes_skips_frozen_parameters():
    model = make_digits_mlp(hidden=4)
    model.fc1.bias.requires_grad_(False)
    assert layer_sizes(model) == [("fc1", 256), ("fc2", 50)]
