// @generated automatically by Diesel CLI.

diesel::table! {
    accounts (id) {
        id -> Uuid,
        balance -> Int8,
        opening_balance -> Int8,
        version -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    transfer_claims (id) {
        id -> Uuid,
        generation -> Int8,
        claimed_by -> Nullable<Uuid>,
    }
}

diesel::table! {
    transfers (id) {
        id -> Uuid,
        from_id -> Uuid,
        to_id -> Uuid,
        amount -> Int8,
        created_at -> Timestamptz,
        from_version -> Int8,
        from_balance_after -> Int8,
        to_version -> Int8,
        to_balance_after -> Int8,
    }
}

diesel::allow_tables_to_appear_in_same_query!(accounts, transfer_claims, transfers,);
