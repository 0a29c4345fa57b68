"""The service's request limits, defined once: the `limits` of the application's args in the Serve config, and
what GET /v1/models reports of them. Every check against them happens at the ingress, before a replica sees the
request, except each image replica's own budget of queued pixels (max_queued_pixels, a deployment option)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    # Every limit is in every response that reports them, so the response schema marks them all required.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    max_records_per_request: int = Field(10_000, ge=1, description="records per log_prob/anomaly request (413)")
    max_samples_per_request: int = Field(10_000, ge=1, description="n per sample request of a model of records (413)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body bytes, decompressed (413)")
    max_new_tokens: int = Field(1024, ge=1, description="tokens one request may generate (400)")
    max_num_beams: int = Field(8, ge=1, description="beam width (400)")
    max_n: int = Field(16, ge=1, description="samples of one prompt (400)")
    max_texts_per_request: int = Field(64, ge=1, description="texts one score or anomaly request may hold")
    max_prompts_per_request: int = Field(16, ge=1, description="prompts one completions request may hold (400)")
    max_images_per_request: int = Field(256, ge=1, description="image models: images per log_prob/anomaly request, "
                                        "n per sample request, len(images) * n per complete request (413)")
    max_image_pixels_per_request: int = Field(
        262_144, ge=1, description="image models: the sampling cost of one sample or complete request, images x "
        "height x width (400 limit_exceeded past it); each replica also budgets the pixels it holds "
        "(max_queued_pixels, 503)")
