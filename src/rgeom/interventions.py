"""Interventions along refusal directions, and the search for the carrier direction.

The names importers know from here live in smaller modules:

* :mod:`rgeom.hooks`: directional (or rank-k) ablation, activation addition, weight
  orthogonalization, and :class:`~rgeom.hooks.PrefixCache` for cheap additions.
* :mod:`rgeom.scoring`: last-position logits, the refusal score and the KL at the last
  position.
* :mod:`rgeom.carrier_search`: scoring a candidate direction and choosing the carrier
  (Arditi et al. 2024, appendix C), with bootstrap intervals.
* :mod:`rgeom.carrier_table`: the carrier search on files, as the ``carriers`` stage runs it.
"""

from __future__ import annotations

from rgeom.carrier_search import CarrierSearch as CarrierSearch
from rgeom.carrier_search import SearchSettings as SearchSettings
from rgeom.carrier_search import admissible as admissible
from rgeom.carrier_search import bootstrap_means as bootstrap_means
from rgeom.carrier_search import layer_cut as layer_cut
from rgeom.carrier_search import score_direction as score_direction
from rgeom.carrier_search import select_carrier as select_carrier
from rgeom.carrier_table import CI_COLUMNS as CI_COLUMNS
from rgeom.carrier_table import carrier_search_table as carrier_search_table
from rgeom.carrier_table import select_candidates as select_candidates

# The filter lives with the direction stage, which runs without torch.
from rgeom.geometry import filter_by_baseline as filter_by_baseline
from rgeom.hooks import PrefixCache as PrefixCache
from rgeom.hooks import ablation as ablation
from rgeom.hooks import addition as addition
from rgeom.hooks import orthogonalize_weights as orthogonalize_weights
from rgeom.hooks import orthonormal_basis as orthonormal_basis
from rgeom.hooks import project_out as project_out
from rgeom.schemas import CARRIER_SCHEMA as CARRIER_SCHEMA
from rgeom.scoring import REFUSAL_PREFIXES as REFUSAL_PREFIXES
from rgeom.scoring import kl_last_position as kl_last_position
from rgeom.scoring import last_logits as last_logits
from rgeom.scoring import refusal_score as refusal_score
from rgeom.scoring import refusal_score_from_logits as refusal_score_from_logits
from rgeom.scoring import refusal_token_ids as refusal_token_ids
