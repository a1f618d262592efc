"""Generative diffusion: noise schedules, Gaussian diffusion (DDPM/DDIM), flow matching and guidance."""

from xax.arch.diffusion.embeddings import TimestepEmbedder as TimestepEmbedder
from xax.arch.diffusion.embeddings import sincos_2d as sincos_2d
from xax.arch.diffusion.embeddings import timestep_embedding as timestep_embedding
from xax.arch.diffusion.flow import euler_sample as euler_sample
from xax.arch.diffusion.flow import flow_interpolate as flow_interpolate
from xax.arch.diffusion.flow import flow_matching_loss as flow_matching_loss
from xax.arch.diffusion.flow import flow_velocity as flow_velocity
from xax.arch.diffusion.flow import heun_sample as heun_sample
from xax.arch.diffusion.gaussian import Denoiser as Denoiser
from xax.arch.diffusion.gaussian import Prediction as Prediction
from xax.arch.diffusion.gaussian import diffusion_loss as diffusion_loss
from xax.arch.diffusion.gaussian import posterior_mean_variance as posterior_mean_variance
from xax.arch.diffusion.gaussian import q_sample as q_sample
from xax.arch.diffusion.gaussian import to_x0_eps as to_x0_eps
from xax.arch.diffusion.guidance import conditioned as conditioned
from xax.arch.diffusion.guidance import drop_labels as drop_labels
from xax.arch.diffusion.guidance import guided as guided
from xax.arch.diffusion.samplers import ddim_invert as ddim_invert
from xax.arch.diffusion.samplers import ddim_sample as ddim_sample
from xax.arch.diffusion.samplers import ddpm_sample as ddpm_sample
from xax.arch.diffusion.samplers import sampling_model as sampling_model
from xax.arch.diffusion.samplers import sampling_params as sampling_params
from xax.arch.diffusion.samplers import scan_steps as scan_steps
from xax.arch.diffusion.schedules import GaussianSchedule as GaussianSchedule
from xax.arch.diffusion.schedules import continuous_alpha_bar as continuous_alpha_bar
