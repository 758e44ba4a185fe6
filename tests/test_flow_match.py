"""The flow-matching samplers (flow_euler, scm) against diffusers' schedulers, step by step on the same model
outputs and noise, and the rule that keeps flow and DDPM samplers to their own models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sd_onnx.runtime.schedulers import (
    FLOW_SCHEDULERS,
    calculate_shift,
    is_flow_matching,
    make_scheduler,
    resolve_name,
    scheduler_names,
)

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SANA_SPRINT = {
    "_class_name": "SCMScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "trigflow",
    "sigma_data": 0.5,
}
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
SHAPE = (1, 4, 8, 8)


class ListNoise:
    """Hands out pre-drawn noise, so ours and diffusers' schedulers see the same draws."""

    def __init__(self, draws: list[np.ndarray]) -> None:
        self.draws = iter(draws)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        out = next(self.draws)
        assert out.shape == tuple(shape)
        return out


def flow_reference(config: dict) -> object:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def run_both(ours, theirs, start: int = 0, seed: int = 0) -> float:
    """Denoise from `start` with both, on the same random velocities and step noise; the largest difference."""
    rng = np.random.default_rng(seed)
    x_ours = rng.standard_normal(SHAPE).astype(np.float32)
    x_theirs = torch.from_numpy(x_ours.copy())
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for t_ours, t_theirs in zip(ours.timesteps[start:], theirs.timesteps[start:], strict=True):
        v = rng.standard_normal(SHAPE).astype(np.float32)
        state = generator.get_state()
        draws = [torch.randn(SHAPE, generator=generator).numpy()]
        generator.set_state(state)
        x_theirs = theirs.step(torch.from_numpy(v), t_theirs, x_theirs, generator=generator).prev_sample
        x_ours = ours.step(v, t_ours, x_ours, noise=ListNoise(draws))
        assert x_ours.dtype == np.float32
        worst = max(worst, float(np.abs(x_ours - x_theirs.numpy()).max()))
    return worst


def assert_same_schedule(ours, theirs) -> None:
    """timesteps and sigmas (with the terminal 0) equal to diffusers', in float32."""
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=0, atol=1e-7)
    assert ours.sigmas[-1] == 0.0 and len(ours.sigmas) == len(ours.timesteps) + 1


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_static_shift_matches_diffusers(steps: int, shift: float) -> None:
    config = {**SD3, "shift": shift}
    ours, theirs = make_scheduler("flow_euler", config), flow_reference(config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert_same_schedule(ours, theirs)
    assert ours.num_inference_steps == steps and ours.init_noise_sigma == 1.0
    assert run_both(ours, theirs) <= 1e-6


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_calculate_shift_is_fluxs(seq_len: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift

    assert calculate_shift(seq_len, FLUX) == flux_shift(seq_len)
    custom = {"base_image_seq_len": 64, "max_image_seq_len": 1024, "base_shift": 0.3, "max_shift": 2.0}
    assert calculate_shift(seq_len, custom) == flux_shift(seq_len, 64, 1024, 0.3, 2.0)
    assert calculate_shift(seq_len, {}) == flux_shift(seq_len)  # diffusers' defaults


@pytest.mark.parametrize(
    "variant",
    [{}, {"time_shift_type": "linear"}, {"shift_terminal": 0.1}, {"use_karras_sigmas": True}],
    ids=["exponential", "linear", "shift_terminal", "karras"],
)
@pytest.mark.parametrize("steps", [2, 4, 28])
def test_dynamic_shift_with_fluxs_sigmas_matches_diffusers(steps: int, variant: dict) -> None:
    """As FLUX's pipeline calls it: sigmas linspace(1, 1/N, N) and mu for a 1024x1024 image (4096 tokens)."""
    config = {**FLUX, **variant}
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(4096, config)
    ours, theirs = make_scheduler("flow_euler", config), flow_reference(config)
    ours.set_timesteps(sigmas=sigmas, mu=mu)
    theirs.set_timesteps(sigmas=sigmas, mu=mu)
    assert_same_schedule(ours, theirs)
    assert ours.num_inference_steps == steps
    assert run_both(ours, theirs) <= 1e-6


@pytest.mark.parametrize(
    "variant",
    [{"shift_terminal": 0.05}, {"use_exponential_sigmas": True}, {"use_dynamic_shifting": True}],
    ids=["shift_terminal", "exponential_sigmas", "dynamic-spaced"],
)
def test_spaced_schedules_match_diffusers(variant: dict) -> None:
    """Without explicit sigmas (SD3's call), also with dynamic shifting and a mu."""
    config = {**SD3, **variant}
    ours, theirs = make_scheduler("flow_euler", config), flow_reference(config)
    ours.set_timesteps(12, mu=0.8)
    theirs.set_timesteps(12, mu=0.8)
    assert_same_schedule(ours, theirs)
    assert run_both(ours, theirs) <= 1e-6


def test_z_image_sigmas_and_num_steps_together() -> None:
    """Z-Image passes float sigmas from torch.linspace with the step count; a count that disagrees is refused."""
    sigmas = torch.linspace(1.0, 1 / 8, 8).tolist()
    ours, theirs = make_scheduler("flow_euler", SD3), flow_reference(SD3)
    ours.set_timesteps(8, sigmas=sigmas)
    theirs.set_timesteps(8, sigmas=sigmas)
    assert_same_schedule(ours, theirs)
    with pytest.raises(ValueError, match="7 sigmas given for 8 steps"):
        ours.set_timesteps(8, sigmas=sigmas[:7])


def test_stochastic_sampling_matches_diffusers_with_the_same_noise() -> None:
    config = {**SD3, "stochastic_sampling": True}
    ours, theirs = make_scheduler("flow_euler", config), flow_reference(config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert run_both(ours, theirs, seed=3) <= 1e-6
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="pass a noise source"):
        ours.step(np.zeros(SHAPE, np.float32), ours.timesteps[0], np.zeros(SHAPE, np.float32))


@pytest.mark.parametrize("start", [0, 3, 7])
def test_img2img_noising_and_steps_from_a_begin_index(start: int) -> None:
    """add_noise at the start timestep is diffusers' scale_noise after set_begin_index (SD3 img2img), and the
    inpainting re-noising to the next timestep after a step matches too."""
    config = {**SD3, "shift": 3.0}
    ours, theirs = make_scheduler("flow_euler", config), flow_reference(config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    ours.set_begin_index(start)
    theirs.set_begin_index(start)
    rng = np.random.default_rng(start)
    image, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t = theirs.timesteps[start : start + 1]
    expected = theirs.scale_noise(torch.from_numpy(image), t, torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(ours.add_noise(image, noise, ours.timesteps[start]), expected, rtol=0, atol=1e-6)
    assert run_both(ours, theirs, start=start) <= 1e-6
    # After the steps: the last step's index; a timestep outside the schedule is noised at t / 1000.
    ours.step_index = theirs._step_index = start + 1
    t_next = theirs.timesteps[start + 1 : start + 2]
    expected = theirs.scale_noise(torch.from_numpy(image), t_next, torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(ours.add_noise(image, noise, ours.timesteps[start + 1]), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.add_noise(image, noise, 250.0), 0.25 * noise + 0.75 * image, atol=1e-6)


def test_sigma_at_is_the_flow_sigma_of_each_timestep() -> None:
    ours = make_scheduler("flow_euler", FLUX)
    ours.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=calculate_shift(4096, FLUX))
    np.testing.assert_allclose(ours.sigma_at(ours.timesteps), ours.sigmas[:-1], rtol=1e-6)
    assert ours.sigma_at(np.array([1000.0, 0.0])).tolist() == [1.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(1, 60),
    shift=st.floats(0.5, 8.0),
    mu=st.floats(-1.0, 3.0),
    dynamic=st.booleans(),
    explicit=st.booleans(),
)
def test_any_schedule_matches_diffusers(steps: int, shift: float, mu: float, dynamic: bool, explicit: bool) -> None:
    config = {**SD3, "shift": shift, "use_dynamic_shifting": dynamic}
    sigmas = np.linspace(1.0, 1 / steps, steps) if explicit else None
    ours, theirs = make_scheduler("flow_euler", config), flow_reference(config)
    ours.set_timesteps(None if explicit else steps, sigmas=sigmas, mu=mu)
    theirs.set_timesteps(None if explicit else steps, sigmas=sigmas, mu=mu)
    assert_same_schedule(ours, theirs)


def test_unsupported_flow_options_are_refused() -> None:
    with pytest.raises(ValueError, match="use_dynamic_shifting.*pass mu"):
        make_scheduler("flow_euler", FLUX).set_timesteps(4)
    with pytest.raises(ValueError, match="use_beta_sigmas is not supported"):
        make_scheduler("flow_euler", {**SD3, "use_beta_sigmas": True})
    with pytest.raises(ValueError, match="invert_sigmas"):
        make_scheduler("flow_euler", {**SD3, "invert_sigmas": True})
    with pytest.raises(ValueError, match="only one of"):
        make_scheduler("flow_euler", {**SD3, "use_karras_sigmas": True, "use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="time_shift_type"):
        make_scheduler("flow_euler", {**SD3, "time_shift_type": "cubic"})
    with pytest.raises(ValueError, match="shift_terminal cannot stretch"):
        make_scheduler("flow_euler", {**SD3, "shift_terminal": 0.1}).set_timesteps(1)


def test_a_dynamic_shift_past_float32_is_refused_in_one_line() -> None:
    """A config's shift line can make e^mu overflow (or 0/0) for some image size: a ValueError naming the config,
    not an OverflowError or a schedule of NaN that draws a black image."""
    steep = {**FLUX, "base_image_seq_len": 1, "max_image_seq_len": 2, "base_shift": -10.0, "max_shift": 10.0}
    with pytest.raises(ValueError, match="shifts the schedule by e\\^.*past a float32"):
        make_scheduler("flow_euler", steep).set_timesteps(4, mu=calculate_shift(4096, steep))
    with pytest.raises(ValueError, match="past a float32"):
        make_scheduler("flow_euler", FLUX).set_timesteps(4, mu=float("nan"))
    falling = {**steep, "base_shift": 10.0, "max_shift": -10.0}
    with pytest.raises(ValueError, match="schedule that is not finite"):
        make_scheduler("flow_euler", falling).set_timesteps(4, mu=calculate_shift(4096, falling))


def test_sanas_flow_dpm_config_keeps_its_shift() -> None:
    """SANA's DPM-Solver config with flow sigmas is a flow model: flow_euler runs it with its flow_shift too."""
    sana = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction", "flow_shift": 3.0}
    sana |= {"use_flow_sigmas": True, "beta_schedule": "linear"}
    assert make_scheduler("flow_euler", sana).config["shift"] == 3.0
    with pytest.raises(
        ValueError, match="dpmpp_2m cannot sample a flow-matching model; samplers that can: flow_euler, dpmpp_2m_flow"
    ):
        make_scheduler("dpmpp_2m", sana)


@pytest.mark.parametrize("name", ["euler", "Euler a", "DPM++ 2M Karras", "ddim", "lcm"])
def test_ddpm_samplers_refuse_flow_models(name: str) -> None:
    key = resolve_name(name)
    with pytest.raises(ValueError, match=f"^{key} cannot sample a flow-matching model; samplers that can: flow_euler$"):
        make_scheduler(name, SD3)
    with pytest.raises(ValueError, match=f"^{key} cannot sample a flow-matching model; samplers that can: scm$"):
        make_scheduler(name, SANA_SPRINT)


def test_flow_samplers_refuse_other_models() -> None:
    with pytest.raises(
        ValueError,
        match=r"flow_euler cannot sample a DDPM-style \(beta schedule\) model; samplers that can: pndm, ddim, euler",
    ):
        make_scheduler("flow_euler", SD15)
    with pytest.raises(ValueError, match=r"flow_euler cannot sample a TrigFlow \(sCM\) model; samplers that can: scm"):
        make_scheduler("Euler flow", SANA_SPRINT)
    with pytest.raises(
        ValueError, match=r"scm cannot sample a rectified-flow \(FlowMatch\) model; samplers that can: flow_euler"
    ):
        make_scheduler("scm", FLUX)
    with pytest.raises(ValueError, match=r"scm cannot sample a DDPM-style"):
        make_scheduler("scm", {"beta_schedule": "linear"})
    # A config that names no kind of model: each sampler's own defaults.
    assert make_scheduler("flow_euler", {}).config["shift"] == 1.0
    assert make_scheduler("euler", {}).config["beta_schedule"] == "linear"


@pytest.mark.parametrize(
    ("config", "flow"),
    [
        (SD3, True),
        (FLUX, True),
        ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, True),
        (SANA_SPRINT, True),
        (
            {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True},
            True,
        ),
        (SD15, False),
        ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}, False),
        ({}, False),
    ],
)
def test_is_flow_matching(config: dict, flow: bool) -> None:
    assert is_flow_matching(config) is flow


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("flow_euler", "flow_euler"),
        ("FlowMatchEulerDiscreteScheduler", "flow_euler"),
        ("Euler flow", "flow_euler"),
        ("euler_flow", "flow_euler"),
        ("flowmatcheuler", "flow_euler"),
        ("SCMScheduler", "scm"),
        ("Euler", "euler"),  # Forge's FLUX "Euler" stays the DDPM Euler: the model's config refuses it
    ],
)
def test_flow_sampler_names(alias: str, key: str) -> None:
    assert resolve_name(alias) == key


def test_every_sampler_is_listed() -> None:
    assert set(FLOW_SCHEDULERS) <= set(scheduler_names())
    assert "FlowMatchEulerDiscreteScheduler" in scheduler_names() and "DPM++ 2M Karras" in scheduler_names()


# --- sCM (SANA-Sprint) ---


def scm_reference():
    from diffusers import SCMScheduler

    return SCMScheduler.from_config(SANA_SPRINT)


@pytest.mark.parametrize(
    ("steps", "kwargs", "ours_kwargs"),
    [
        (1, {"intermediate_timesteps": None}, {}),
        (2, {}, {}),
        (2, {"intermediate_timesteps": 1.1}, {"intermediate_timesteps": 1.1}),
        (4, {"intermediate_timesteps": None}, {}),
        (3, {"intermediate_timesteps": None, "max_timesteps": 1.4}, {"max_timesteps": 1.4}),
        (
            2,
            {"timesteps": [1.5, 0.9, 0.0], "max_timesteps": None, "intermediate_timesteps": None},
            {"timesteps": [1.5, 0.9, 0.0]},
        ),
    ],
)
def test_scm_matches_diffusers(steps: int, kwargs: dict, ours_kwargs: dict) -> None:
    ours, theirs = make_scheduler("scm", SANA_SPRINT), scm_reference()
    ours.set_timesteps(steps, **ours_kwargs)
    theirs.set_timesteps(steps, **kwargs)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy()[:-1])
    assert ours.init_noise_sigma == 0.5
    rng = np.random.default_rng(steps)
    x_ours = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(0.5)
    x_theirs = torch.from_numpy(x_ours.copy())
    generator = torch.Generator().manual_seed(steps)
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps[:-1], strict=True):
        v = rng.standard_normal(SHAPE).astype(np.float32)
        state = generator.get_state()
        draws = [torch.randn(SHAPE, generator=generator).numpy()]
        generator.set_state(state)
        x_theirs, x0 = theirs.step(torch.from_numpy(v), t_theirs, x_theirs, generator=generator, return_dict=False)
        x_ours = ours.step(v, t_ours, x_ours, noise=ListNoise(draws))
        np.testing.assert_allclose(x_ours, x_theirs.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.pred_original_sample, x0.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(x_ours, ours.pred_original_sample)  # the last angle is 0: x0 itself


def test_scm_pipeline_conversions_match_sana_sprint() -> None:
    """The transformer's timestep, input and output conversions, as SANA-Sprint's pipeline writes them."""
    ours = make_scheduler("scm", SANA_SPRINT)
    ours.set_timesteps(2)
    rng = np.random.default_rng(0)
    latents, raw, image, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4))
    sigma_data = 0.5
    for t in ours.timesteps:
        timestep = torch.tensor([t])
        scm_t = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        s = scm_t.view(-1, 1, 1, 1)
        model_input = torch.from_numpy(latents) / sigma_data * torch.sqrt(s**2 + (1 - s) ** 2)
        velocity = ((1 - 2 * s) * model_input + (1 - 2 * s + 2 * s**2) * torch.from_numpy(raw)) / torch.sqrt(
            s**2 + (1 - s) ** 2
        )
        np.testing.assert_allclose(ours.model_timestep(t), scm_t.numpy()[0], rtol=1e-6)
        ours_input = ours.scale_model_input(latents, t)
        np.testing.assert_allclose(ours_input, model_input.numpy(), rtol=0, atol=1e-6)
        expected = (velocity * sigma_data).numpy()
        np.testing.assert_allclose(ours.model_velocity(raw, ours_input, t), expected, rtol=0, atol=1e-6)
        assert ours.sigma_at(np.array([t]))[0] == pytest.approx(float(scm_t[0]), rel=1e-6)
        # SANA-Sprint img2img's prepare_latents: cos(t) * latents * sigma_data + sin(t) * noise * sigma_data
        noised = torch.cos(timestep) * torch.from_numpy(image) * sigma_data
        noised = noised + torch.sin(timestep) * torch.from_numpy(noise) * sigma_data
        np.testing.assert_allclose(ours.add_noise(image, noise, t), noised.numpy(), rtol=0, atol=1e-6)


def test_scm_refusals() -> None:
    ours = make_scheduler("scm", SANA_SPRINT)
    with pytest.raises(ValueError, match="intermediate_timesteps applies to 2 steps only"):
        ours.set_timesteps(3, intermediate_timesteps=1.3)
    with pytest.raises(ValueError, match="need num_inference_steps \\+ 1 = 3 angles"):
        ours.set_timesteps(2, timesteps=[1.5, 0.0])
    with pytest.raises(ValueError, match="unknown prediction_type"):
        make_scheduler("scm", {**SANA_SPRINT, "prediction_type": "x0"})


# --- DPM-Solver++(2M) on flow sigmas (SANA) ---

SANA_DPM = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "use_flow_sigmas": True,
            "flow_shift": 3.0, "prediction_type": "flow_prediction", "algorithm_type": "dpmsolver++",
            "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "final_sigmas_type": "zero",
            "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}  # fmt: skip


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("start", [0, 2])
def test_dpm_solver_on_flow_sigmas_matches_diffusers(steps: int, start: int) -> None:
    """SANA's published sampler: timesteps, sigmas, img2img noising from a begin index and every step against
    diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True) on the same model outputs."""
    from diffusers import DPMSolverMultistepScheduler

    start = min(start, steps - 1)
    theirs = DPMSolverMultistepScheduler.from_config(SANA_DPM)
    theirs.set_timesteps(steps)
    ours = make_scheduler("dpmpp_2m_flow", SANA_DPM)
    ours.set_timesteps(steps)
    assert np.array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, theirs.sigmas.numpy())
    rng = np.random.default_rng(steps)
    image, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    ours.set_begin_index(start)
    theirs.set_begin_index(start)
    t0 = theirs.timesteps[start : start + 1]
    sample = ours.add_noise(image, noise, ours.timesteps[start])
    want = theirs.add_noise(torch.from_numpy(image), torch.from_numpy(noise), t0).numpy()
    np.testing.assert_allclose(sample, want, atol=1e-6)
    theirs_sample = torch.from_numpy(sample)
    for t in ours.timesteps[start:]:
        output = rng.standard_normal(SHAPE).astype(np.float32)
        sample = ours.step(output, t, sample)
        theirs_sample = theirs.step(torch.from_numpy(output), t, theirs_sample).prev_sample
        np.testing.assert_allclose(sample, theirs_sample.numpy(), atol=1e-5)


def test_dpm_solver_on_flow_sigmas_is_sanas_own_and_no_one_elses() -> None:
    from sd_onnx.runtime.schedulers import default_sampler, sampler_for

    assert default_sampler(SANA_DPM) == "dpmpp_2m_flow" and default_sampler(SD15) == "pndm"
    assert sampler_for("dpmpp_2m", SANA_DPM) == "dpmpp_2m_flow"  # A1111's "DPM++ 2M" on SANA, as Forge reads it
    assert sampler_for("euler", SANA_DPM) == "flow_euler" and sampler_for("euler", SANA_SPRINT) == "scm"
    assert sampler_for("dpmpp_2m", SD3) == "dpmpp_2m"  # refused by make_scheduler: SD3's schedule is not DPM's
    with pytest.raises(ValueError, match="dpmpp_2m_flow follows DPM-Solver's own flow sigmas.*can: flow_euler$"):
        make_scheduler("dpmpp_2m_flow", SD3)
    with pytest.raises(ValueError, match="dpmpp_2m_flow cannot sample a DDPM-style"):
        make_scheduler("DPM++ 2M flow", SD15)
