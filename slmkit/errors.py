"""The one error type users see: a clear one-line message naming what went wrong and where."""


class SlmError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line, no traceback."""


class ApiError(SlmError):
    """A request that cannot be served, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
    Raised by the batching engine (a prompt too long for the context, a full queue) and by the HTTP server."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             411: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
