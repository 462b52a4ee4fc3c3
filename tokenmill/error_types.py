"""OpenAI's error `type` for each HTTP status, for every tokenmill process that answers
OpenAI clients: the server and the router must label the same status alike, and the router
may not import the server (import-linter contract `router-over-http`)."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
