"""Pure flow semantics: tree validation, the state machine, `decide`. No grpc, SQL, asyncio or clock."""
