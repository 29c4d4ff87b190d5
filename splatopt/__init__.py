"""splatopt: text as mobile Gaussian splats of embeddings, fitted by gradient descent.

    import splatopt
    result = splatopt.fit(["Return the sum of a and b."], n_splats=0.5, steps=300)
    print(result.texts[0], result.token_accuracy)
"""

from . import ablate
from .edit import edit
from .fit import FitResult, Targets, fit, fit_options
from .kernels import field_loss
from .init import GridInit, Initializer, TokenInit, WarmStart, resolve_initializer
from .objectives import Objective, decode_cross_entropy, mean_cosine, objective_terms, relative_mse, token_accuracy
from .optim import InnerOptimizer, adam_init, adam_step, closed_form_v, solve_embeddings
from .render import KERNELS, MODES, kernel_values, render, splat_weights
from .render_local import render_local
from .splats import SplatSet

__version__ = "0.1.0"

__all__ = [
    "FitResult", "GridInit", "Initializer", "InnerOptimizer", "KERNELS", "MODES", "Objective", "SplatSet",
    "Targets", "TokenInit", "WarmStart", "ablate", "adam_init", "edit", "adam_step", "closed_form_v", "decode_cross_entropy", "field_loss", "fit", "fit_options",
    "kernel_values", "mean_cosine", "objective_terms", "relative_mse", "render", "render_local", "resolve_initializer",
    "solve_embeddings", "splat_weights", "token_accuracy",
]
