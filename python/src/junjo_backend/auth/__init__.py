"""The auth gRPC server: `ValidateApiKey` answered from the API keys in the database."""
