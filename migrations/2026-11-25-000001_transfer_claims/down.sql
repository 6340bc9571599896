DROP TABLE transfer_claims;
