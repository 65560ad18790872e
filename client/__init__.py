"""quickstep.client: the Python SDK (Client, AsyncClient), typed errors, the `quickstep` CLI and load generator."""

from .errors import (
    AuthError,
    ConnectionFailedError,
    DecodeError,
    GatewayTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    QuickstepError,
    RateLimitedError,
    ServerError,
    UnavailableError,
    ValidationError,
)
from .retry import RetryPolicy
from .sdk import AsyncClient, Client, GeneratedImage, GenerateResult, Health

__all__ = [
    "AsyncClient", "AuthError", "Client", "ConnectionFailedError", "DecodeError", "GatewayTimeoutError", "GenerateResult",
    "GeneratedImage", "Health", "NotFoundError", "PayloadTooLargeError", "QuickstepError", "RateLimitedError",
    "RetryPolicy", "ServerError", "UnavailableError", "ValidationError",
]
