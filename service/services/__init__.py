"""Protocol-neutral services over the ModelCatalog: what a request means for each family of models, checked and
answered the same way whichever protocol (genserve's /v1, OpenAI's completions, the Open Inference Protocol's /v2)
asked. They take and return plain values and raise service/errors.py's domain errors; the routers in service/api/
translate requests and responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genserve.service.catalog import ModelCatalog
from genserve.service.services.anomaly import AnomalyService
from genserve.service.services.images import ImageService
from genserve.service.services.management import ManagementService
from genserve.service.services.records import RecordsService
from genserve.service.services.text import TextService


@dataclass
class Services:
    """Every service of one ingress replica, over its catalog."""

    catalog: ModelCatalog
    records: RecordsService
    images: ImageService
    text: TextService
    anomaly: AnomalyService
    management: ManagementService

    @classmethod
    def over(cls, catalog: ModelCatalog, repository: Any) -> Services:
        """The services over `catalog`; model management asks `repository` (the ModelRepository's handle)."""
        records, images, text = RecordsService(catalog), ImageService(catalog), TextService(catalog)
        return cls(catalog, records, images, text, AnomalyService(catalog, records, images, text),
                   ManagementService(repository))
